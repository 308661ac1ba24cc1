"""One chat completion: {"id", "content", "choices", "usage"}."""

from sdkcommon import run, usage


def call(client, kwargs):
    r = client.chat.completions.create(**kwargs)
    return {
        "id": r.id,
        "content": r.choices[0].message.content,
        "choices": len(r.choices),
        "usage": usage(r.usage),
    }


run(call)
