#!/usr/bin/env python3
"""The official `openai` and `anthropic` SDKs, unchanged, against GreenThread's API server:
every route beyond chat, by `model`, and the comments a stream gets while a wake is under way.

  sdk_routes.py BASE_URL API_KEY GATED_MODEL GATE_FILE MODEL_A:ENGINE_ID_A MODEL_B:ENGINE_ID_B

GATED_MODEL sleeps and its engine's wake waits until GATE_FILE exists (`sim-engine
--wake-gate`): a streamed chat to it must receive SSE comment lines while it wakes, and the
SDK must skip them. The transport below sees the bytes the SDK reads; it creates GATE_FILE
once two comments have passed through, so the wake is held open for exactly as long as the
check needs. Then each of embeddings, responses, audio transcriptions, rerank and Anthropic's
messages goes to both models, and each answer must come from the model it named. Prints a
JSON report and exits non-zero on any failed check.
"""

import json
import pathlib
import sys
import urllib.request

import anthropic
import httpx2
import openai

base, key, gated, gate = sys.argv[1:5]
models = dict(m.split(":", 1) for m in sys.argv[5:7])
report = {}


def check(cond, what):
    if not cond:
        print(json.dumps(report, indent=1, default=str))
        raise SystemExit(f"FAILED: {what}")


class Recording(httpx2.BaseTransport):
    """A transport that shows the SDK's response bytes to `seen` before the SDK reads them."""

    def __init__(self, seen):
        self.inner = httpx2.HTTPTransport()
        self.seen = seen

    def handle_request(self, request):
        resp = self.inner.handle_request(request)
        inner, seen = resp.stream, self.seen

        class Stream(httpx2.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    seen(chunk)
                    yield chunk

            def close(self):
                inner.close()

        return httpx2.Response(resp.status_code, headers=resp.headers, stream=Stream(), extensions=resp.extensions)


# 1. Wake feedback: comments while the gated model wakes, skipped by the SDK.
raw = bytearray()


def seen(chunk):
    raw.extend(chunk)
    if raw.count(b"\n: waking ") + raw.startswith(b": waking ") >= 2:
        pathlib.Path(gate).touch()


client = openai.OpenAI(
    base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120,
    http_client=openai.DefaultHttpxClient(transport=Recording(seen)),
)
prompt = [{"role": "user", "content": "Say something about sleeping GPUs."}]
stream = client.chat.completions.create(model=gated, messages=prompt, max_tokens=6, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
comments = [l for l in raw.decode().split("\n") if l.startswith(":")]
report["comments"] = comments
check(len(comments) >= 2, f"at least two comments while waking, got {comments}")
check(all(l.startswith(f": waking {gated}, ") and l.endswith(" s") for l in comments), f"comment shape: {comments}")
plain = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
whole = plain.chat.completions.create(model=gated, messages=prompt, max_tokens=6)
report["streamed"], report["whole"] = streamed, whole.choices[0].message.content
check(streamed.split() == whole.choices[0].message.content.split() and streamed.strip(), "the stream carried the answer, comments skipped")

# 2. Every route, to both models: the answer names the engine it came from.
claude = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)
for name, engine_id in models.items():
    r = plain.embeddings.create(model=name, input=["a sleeping gpu", "a waking gpu"])
    check(r.model == engine_id and len(r.data) == 2, f"{name}: embeddings {r}")
    as_floats = plain.embeddings.create(model=name, input="a sleeping gpu", encoding_format="float")
    # The SDK asks for base64 by default and decodes it: the same vector either way.
    check(len(r.data[0].embedding) == 32 and all(abs(a - b) < 1e-6 for a, b in zip(r.data[0].embedding, as_floats.data[0].embedding)), f"{name}: base64 and float embeddings differ")
    check(r.data[0].embedding != r.data[1].embedding, f"{name}: two inputs embed alike")

    r = plain.responses.create(model=name, input="Tell me about GPUs.", max_output_tokens=5)
    check(r.model == engine_id and len(r.output_text.split()) == 5, f"{name}: responses {r}")
    check(r.usage.output_tokens == 5 and r.usage.input_tokens > 0, f"{name}: responses usage {r.usage}")

    r = plain.audio.transcriptions.create(model=name, file=("clip.wav", b"RIFF" + bytes(3000), "audio/wav"))
    check(r.text.strip() != "" and r.model_extra.get("model") == engine_id, f"{name}: transcription {r}")

    req = urllib.request.Request(
        f"{base}/v1/rerank",
        data=json.dumps({"model": name, "query": "gpu", "documents": ["one", "two", "three"], "top_n": 2}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    r = json.load(urllib.request.urlopen(req, timeout=120))
    scores = [x["relevance_score"] for x in r["results"]]
    check(r["model"] == engine_id and len(scores) == 2 and scores == sorted(scores, reverse=True), f"{name}: rerank {r}")

    m = claude.messages.create(model=name, max_tokens=4, messages=[{"role": "user", "content": "Hello"}])
    check(m.model == engine_id and m.stop_reason == "max_tokens" and len(m.content[0].text.split()) == 4, f"{name}: messages {m}")
    check(m.usage.output_tokens == 4, f"{name}: messages usage {m.usage}")
    report[name] = {"messages": m.content[0].text}

# 3. Refusals, as each SDK's own errors.
try:
    claude.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    check(False, "an unknown model was answered")
except anthropic.NotFoundError as e:
    check("no-such-model" in str(e), f"unknown model error: {e}")
try:
    anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
        model=next(iter(models)), max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    check(False, "a wrong key was let in")
except anthropic.AuthenticationError:
    pass
try:
    plain.embeddings.create(model="no-such-model", input="x")
    check(False, "an unknown model was answered")
except openai.NotFoundError:
    pass

print(json.dumps(report))
