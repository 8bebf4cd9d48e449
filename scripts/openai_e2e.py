#!/usr/bin/env python3
"""The official `openai` SDK, unchanged, against GreenThread's API server.

  openai_e2e.py BASE_URL MODEL_A MODEL_B [ROUNDS]

Lists models; chats (plain and streaming) and completes; an unknown model raises the
SDK's NotFoundError; then alternates between the two models ROUNDS times so that each
request needs the other model put to sleep. At temperature 0 the same prompt must give
the same answer before and after every sleep/wake. Prints a JSON report (answers,
token counts, wall time of each request) and exits non-zero on any failed check.
"""

import json
import sys
import time

import openai

base, model_a, model_b = sys.argv[1:4]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=300)
report = {"requests": []}
PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
MAX_TOKENS = 12


def check(cond, what):
    if not cond:
        print(json.dumps(report, indent=1))
        raise SystemExit(f"FAILED: {what}")


def chat(model):
    t = time.monotonic()
    r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=MAX_TOKENS, seed=1)
    took = time.monotonic() - t
    choice = r.choices[0]
    check(isinstance(choice.message.content, str) and choice.message.content != "", f"{model}: chat content {r}")
    check(choice.finish_reason in ("stop", "length"), f"{model}: finish_reason {choice.finish_reason}")
    check(r.usage is not None and 0 < r.usage.completion_tokens <= MAX_TOKENS, f"{model}: usage {r.usage}")
    check(r.usage.prompt_tokens > 0, f"{model}: prompt tokens {r.usage}")
    report["requests"].append({"kind": "chat", "model": model, "seconds": round(took, 3), "tokens": r.usage.completion_tokens})
    return choice.message.content


# Listing never wakes anything, and names both models.
ids = {m.id for m in client.models.list().data}
check({model_a, model_b} <= ids, f"models listed: {ids}")

# Alternate: every request lands on a sleeping model that needs the other one's memory.
answers = {model_a: [], model_b: []}
for i in range(rounds):
    model = (model_a, model_b)[i % 2]
    answers[model].append(chat(model))
report["answers"] = answers
for model, said in answers.items():
    check(len(set(said)) == 1, f"{model}: the same prompt at temperature 0 answered differently across sleep/wake: {said}")

# Streaming: chunks arrive as the SDK expects, and add up to the non-streamed answer.
t = time.monotonic()
stream = client.chat.completions.create(model=model_a, messages=PROMPT, temperature=0, max_tokens=MAX_TOKENS, seed=1, stream=True)
pieces, finish, first = [], None, None
for chunk in stream:
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta.content
    if delta:
        first = first or time.monotonic() - t
        pieces.append(delta)
    finish = chunk.choices[0].finish_reason or finish
report["requests"].append({"kind": "stream", "model": model_a, "seconds": round(time.monotonic() - t, 3), "first_token_seconds": round(first or 0, 3), "chunks": len(pieces)})
check(len(pieces) >= 2, f"streamed in pieces: {pieces}")
check(finish in ("stop", "length"), f"stream finish_reason {finish}")
check("".join(pieces) == answers[model_a][0], f"stream {''.join(pieces)!r} vs chat {answers[model_a][0]!r}")

# Plain completions.
t = time.monotonic()
c = client.completions.create(model=model_b, prompt="The sea is", temperature=0, max_tokens=8)
report["requests"].append({"kind": "completion", "model": model_b, "seconds": round(time.monotonic() - t, 3)})
check(isinstance(c.choices[0].text, str) and c.choices[0].text != "", f"completion text {c}")
check(c.usage is not None and 0 < c.usage.completion_tokens <= 8, f"completion usage {c.usage}")

# An unknown model is the SDK's not-found error.
try:
    client.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=1)
    check(False, "an unknown model was accepted")
except openai.NotFoundError as e:
    report["not_found"] = str(e)[:200]

print(json.dumps(report))
