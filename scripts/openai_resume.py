#!/usr/bin/env python3
"""The official `openai` SDK against a `greenthread local` with `preemption: resume`.

  openai_resume.py BASE_URL MODEL_A MODEL_B

MODEL_A and MODEL_B cannot serve at once. A long answer streams from MODEL_A; midway a
request to MODEL_B preempts it. The stream must pause, not break: MODEL_B answers, then
MODEL_A wakes again and the stream goes on, so that the client reads one answer — one
id, every token it asked for, usage that adds up. An answer is stopped once: a second
request to MODEL_B while the continuation streams waits for it to finish (the
continuation is drained). A request that is not streamed cannot
be continued: it is drained, and answered whole. Prints a JSON report; exits non-zero on
any failed check.
"""

import json
import sys
import threading
import time

import openai

base, model_a, model_b = sys.argv[1:4]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)
report = {}
MAX_TOKENS = 80
PROMPT = [{"role": "user", "content": "Tell a long story about the sea."}]


def check(cond, what):
    if not cond:
        print(json.dumps(report, indent=1))
        raise SystemExit(f"FAILED: {what}")


def other(result):
    t = time.monotonic()
    r = client.chat.completions.create(model=model_b, messages=PROMPT, max_tokens=4)
    result["done"] = time.monotonic()
    result["seconds"] = round(result["done"] - t, 3)
    result["content"] = r.choices[0].message.content


# Streamed: preempted midway, continued after the other model's turn.
stream = client.chat.completions.create(
    model=model_a, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True,
    stream_options={"include_usage": True},
)
ids, pieces, usage, finish, gaps = set(), [], None, None, []
b_result, b_thread = {}, None
again, again_thread = {}, None
last = time.monotonic()
for chunk in stream:
    now = time.monotonic()
    gaps.append(now - last)
    last = now
    ids.add(chunk.id)
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
    if len(pieces) == 10 and b_thread is None:
        b_thread = threading.Thread(target=other, args=(b_result,))
        b_thread.start()
    # Well into the continuation (the pause came after token 10): preempted again.
    if len(pieces) == 30 and again_thread is None:
        b_thread.join()
        again_thread = threading.Thread(target=other, args=(again,))
        again_thread.start()
stream_end = time.monotonic()
b_thread.join()
again_thread.join()
report["streamed"] = {
    "ids": sorted(ids), "tokens": len(pieces), "finish": finish,
    "usage": usage.model_dump() if usage else None, "longestPauseSeconds": round(max(gaps), 3),
}
report["other"] = b_result
check(len(ids) == 1, f"one answer has one id: {ids}")
check(len(pieces) == MAX_TOKENS, f"every token asked for arrived: {len(pieces)} of {MAX_TOKENS}")
check(finish == "length", f"finish_reason {finish}")
check(usage is not None and usage.completion_tokens == MAX_TOKENS, f"completion tokens add up: {usage}")
check(usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"usage {usage}")
check(b_result.get("content"), f"the other model answered: {b_result}")
check(again.get("content"), f"the other model answered again: {again}")
check(again["done"] > stream_end, "the continuation was drained, not stopped a second time: "
      f"the other model answered {stream_end - again['done']:.2f} s before the stream ended")
report["again"] = {"seconds": again["seconds"]}
b_result.pop("done", None)

# Not streamed: drained (it cannot be continued), answered whole.
b_result, b_thread = {}, threading.Thread(target=other, args=({},))
t = time.monotonic()
holder = {}
def long_plain():
    r = client.chat.completions.create(model=model_a, messages=PROMPT, max_tokens=40)
    holder["tokens"] = r.usage.completion_tokens
    holder["finish"] = r.choices[0].finish_reason
a = threading.Thread(target=long_plain)
a.start()
time.sleep(0.5)
b_thread.start()
a.join()
b_thread.join()
report["plain"] = holder
check(holder.get("tokens") == 40 and holder.get("finish") == "length", f"the plain answer is whole: {holder}")
print(json.dumps(report))
