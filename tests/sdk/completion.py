"""One plain completion: {"id", "text", "choices", "usage"}."""

from sdkcommon import run, usage


def call(client, kwargs):
    r = client.completions.create(**kwargs)
    return {
        "id": r.id,
        "text": r.choices[0].text,
        "choices": len(r.choices),
        "usage": usage(r.usage),
    }


run(call)
