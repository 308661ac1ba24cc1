"""One streamed chat completion (`stream=True` is added here).

Prints {"content": the deltas joined, "chunks": how many chunks came,
"usage_chunks": [{"index", "choices", "usage"}] for every chunk that carried a
usage, "empty_choice_chunks": how many chunks had no choices}.
"""

from sdkcommon import run, usage


def call(client, kwargs):
    content = []
    chunks = 0
    usage_chunks = []
    empty = 0
    for i, chunk in enumerate(client.chat.completions.create(stream=True, **kwargs)):
        chunks += 1
        if not chunk.choices:
            empty += 1
        for c in chunk.choices:
            if c.delta.content:
                content.append(c.delta.content)
        if chunk.usage is not None:
            usage_chunks.append({"index": i, "choices": len(chunk.choices), "usage": usage(chunk.usage)})
    return {
        "content": "".join(content),
        "chunks": chunks,
        "usage_chunks": usage_chunks,
        "empty_choice_chunks": empty,
    }


run(call)
