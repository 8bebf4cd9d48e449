#!/usr/bin/env python3
"""The official `openai` SDK, unchanged, against a LoRA adapter served by GreenThread:

  sdk_adapters.py BASE_URL API_KEY ADAPTER PARENT

`models.list()` must list ADAPTER with `parent` PARENT (vLLM's shape, kept by the SDK as an
extra field), and a chat — plain and streamed — naming ADAPTER must be answered by it (the
simulator marks an adapter's answers with the `x-sim-lora-adapter` header and echoes the
name as `model`). Prints a JSON report and exits non-zero on any failed check.
"""

import json
import sys

import openai

base, key, adapter, parent = sys.argv[1:5]
report = {}


def check(cond, what):
    if not cond:
        print(json.dumps(report, indent=1, default=str))
        raise SystemExit(f"FAILED: {what}")


client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)

listed = {m.id: m for m in client.models.list()}
check(adapter in listed, f"{adapter} in models.list(): {sorted(listed)}")
entry = listed[adapter]
report["parent"] = getattr(entry, "parent", None)
check(report["parent"] == parent, f"{adapter}'s parent is {parent}")

messages = [{"role": "user", "content": "hello"}]
raw = client.chat.completions.with_raw_response.create(
    model=adapter, messages=messages, max_tokens=3
)
answer = raw.parse()
report["marked"] = raw.headers.get("x-sim-lora-adapter")
report["model"] = answer.model
check(report["marked"] == adapter, f"the answer came from {adapter}")
check(answer.model == adapter, f"the answer names {adapter}")
check(answer.choices[0].message.content, "the answer has content")

stream = client.chat.completions.create(
    model=adapter, messages=messages, max_tokens=3, stream=True
)
models = {chunk.model for chunk in stream}
report["stream_models"] = sorted(models)
check(models == {adapter}, f"every streamed chunk names {adapter}")

print(json.dumps(report))
