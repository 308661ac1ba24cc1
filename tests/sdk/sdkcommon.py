"""What every SDK script shares: argument parsing, the client, the result line.

A script is run as `python SCRIPT BASE_URL JSON_ARGS`. JSON_ARGS holds the
keyword arguments of the SDK call plus `api_key`. On success the script prints
one JSON line and exits 0. When the SDK raises, it prints one JSON line
{"raised": CLASS, "message": str(e), "status": HTTP status or null,
"headers": response headers or {}} and exits 1.
"""

import json
import sys

import openai


def run(call):
    base_url = sys.argv[1]
    kwargs = json.loads(sys.argv[2])
    api_key = kwargs.pop("api_key", "sk-test")
    # No retries: a test sees exactly the proxy's first answer.
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20.0)
    try:
        result = call(client, kwargs)
    except Exception as e:  # the class name is the result
        response = getattr(e, "response", None)
        headers = {k.lower(): v for k, v in response.headers.items()} if response is not None else {}
        print(json.dumps({
            "raised": type(e).__name__,
            "message": str(e),
            "status": getattr(e, "status_code", None),
            "headers": headers,
        }))
        sys.exit(1)
    print(json.dumps(result))


def usage(u):
    return None if u is None else {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
