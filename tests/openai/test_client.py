#!/usr/bin/env python3
"""Checks Errand's OpenAI-compatible API with the official `openai` client.

    python -m venv .venv && .venv/bin/pip install -r tests/openai/requirements.txt
    .venv/bin/python tests/openai/test_client.py BASE_URL API_KEY MODEL_ID

BASE_URL is the server's root (http://127.0.0.1:8080), API_KEY a user's
token from server.toml, MODEL_ID the served model's id (GET /v1/models).
Prints one line per check and exits non-zero if any check fails.
"""

import json
import sys
import traceback
import urllib.request

import openai
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 600.0  # CPU inference of a cold prompt can take a while.

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}


class Check:
    def __init__(self):
        self.failed = []

    def run(self, name, fn):
        try:
            detail = fn()
            print(f"PASS {name}: {detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        print("usage: test_client.py BASE_URL API_KEY MODEL_ID", file=sys.stderr)
        return 2
    base, key, model = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
    check = Check()
    hello = [{"role": "user", "content": "Say hello in one short sentence."}]

    def plain_chat():
        r = client.chat.completions.create(model=model, messages=hello, max_tokens=32, temperature=0)
        text = r.choices[0].message.content
        expect(r.object == "chat.completion", f"object is {r.object!r}")
        expect(text and text.strip(), f"empty content: {text!r}")
        expect(r.usage is not None, "no usage")
        expect(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, f"usage {r.usage}")
        expect(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage {r.usage}")
        expect(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason!r}")
        return f"{text.strip()!r} ({r.usage.prompt_tokens} prompt, {r.usage.completion_tokens} completion tokens)"

    def streaming():
        stream = client.chat.completions.create(
            model=model,
            messages=hello,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        for chunk in stream:
            expect(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        text = "".join(pieces)
        expect(len(pieces) >= 2, f"only {len(pieces)} content chunks")
        expect(text.strip(), "streamed content is empty")
        expect(finish in ("stop", "length"), f"finish_reason {finish!r}")
        expect(usage is not None and usage.completion_tokens > 0, f"final usage {usage}")
        return f"{len(pieces)} chunks, {text.strip()!r}, usage {usage.prompt_tokens}+{usage.completion_tokens}"

    def tool_call():
        messages = [
            # A small model needs telling that a tool result is to be answered, not called again.
            {
                "role": "system",
                "content": "You are a helpful assistant. Call a tool when you need data; "
                "once a tool result arrives, answer the user in one plain sentence using it.",
            },
            {"role": "user", "content": "What's the weather in Paris? Use the tool."},
        ]
        r = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto", temperature=0, max_tokens=128
        )
        choice = r.choices[0]
        expect(choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason!r}, content {choice.message.content!r}")
        calls = choice.message.tool_calls or []
        expect(len(calls) >= 1, "no tool calls")
        call = calls[0]
        expect(call.type == "function", f"type {call.type!r}")
        expect(call.id, "the call has no id")
        expect(call.function.name == "get_weather", f"function {call.function.name!r}")
        args = json.loads(call.function.arguments)
        expect("paris" in str(args.get("city", "")).lower(), f"arguments {args}")
        # Send the result back and get the answer in words.
        messages.append(
            {
                "role": "assistant",
                "content": choice.message.content,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for c in calls
                ],
            }
        )
        for c in calls:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": c.id,
                    "content": json.dumps({"city": "Paris", "temperature_c": 18, "conditions": "sunny"}),
                }
            )
        r2 = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=64
        )
        answer = r2.choices[0].message.content
        expect(answer and answer.strip(), f"empty final answer (finish_reason {r2.choices[0].finish_reason!r})")
        expect(not r2.choices[0].message.tool_calls, "tool_choice none still returned tool calls")
        expect(not answer.lstrip().startswith(("{", "<tool_call>")), f"the answer is a call written as text: {answer!r}")
        return f"get_weather({call.function.arguments}) then {answer.strip()!r}"

    def models():
        ids = [m.id for m in client.models.list()]
        expect(model in ids, f"{model!r} not in {ids}")
        return f"models {ids}"

    def wrong_key():
        bad = OpenAI(base_url=base + "/v1", api_key="not-a-real-key", max_retries=0, timeout=30)
        try:
            bad.models.list()
        except openai.AuthenticationError as e:
            return f"401 as expected ({e.status_code})"
        raise AssertionError("a wrong API key was accepted")

    def metrics():
        req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode("utf-8")
        samples = [
            s
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "errand_tokens_total"
        ]
        expect(samples, "errand_tokens_total is missing from /metrics")
        positive = [s for s in samples if s.value > 0]
        expect(positive, f"no errand_tokens_total sample > 0: {samples}")
        return ", ".join(f"{s.labels.get('kind', '?')}={s.value:g}" for s in samples)

    check.run("plain chat", plain_chat)
    check.run("streaming", streaming)
    check.run("tool call round trip", tool_call)
    check.run("models list", models)
    check.run("wrong API key", wrong_key)
    check.run("metrics", metrics)

    if check.failed:
        print(f"{len(check.failed)} check(s) failed: {', '.join(check.failed)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
