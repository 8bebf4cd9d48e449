#!/usr/bin/env python3
"""The official `openai` SDK, unchanged, against GreenThread's Batch API, in two phases
around a restart of the server:

  sdk_batch.py start  BASE_URL API_KEY MODEL N STATE_FILE
  sdk_batch.py finish BASE_URL API_KEY MODEL N STATE_FILE

`start` uploads a JSONL file of N chat requests (`files.create`), makes a batch of it
(`batches.create`) and a second one that it cancels (`batches.cancel`), and keeps their ids
in STATE_FILE. `finish` (after the server restarted) finds both again (`batches.retrieve`,
`batches.list`), waits for the first to complete, reads its output (`files.content`) and
checks that every request was answered exactly once, by MODEL, with its own prompt; the
cancelled one must have ended `cancelled`. Prints a JSON report as its last line and exits
non-zero on any failed check.
"""

import io
import json
import sys
import time

import openai

phase, base, key, model, n, state_file = sys.argv[1:7]
n = int(n)
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
report = {"phase": phase}


def check(cond, what):
    if not cond:
        print(json.dumps(report, indent=1, default=str))
        raise SystemExit(f"FAILED: {what}")


def jsonl(count, tag="batch"):
    lines = [
        json.dumps({
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"{tag} request {i}"}],
                     "max_tokens": 4},
        })
        for i in range(count)
    ]
    return ("\n".join(lines) + "\n").encode()


if phase == "start":
    # The other checks first: the main batch starts running the moment it is made, and
    # the test stops the server in its middle, so nothing may take time after it.
    # A batch cancelled at once: it ends cancelled with whatever it finished.
    small = client.files.create(file=("small.jsonl", io.BytesIO(jsonl(3, "cancelled"))), purpose="batch")
    c = client.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    c = client.batches.cancel(c.id)
    check(c.status in ("cancelling", "cancelled"), f"cancel gave {c.status}")
    # Bad input is a failed batch naming the line, as OpenAI's.
    bad = client.files.create(file=("bad.jsonl", io.BytesIO(b'{"custom_id": "x"}\nnot json\n')), purpose="batch")
    failed = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    check(failed.status == "failed" and failed.errors and len(failed.errors.data) == 2,
          f"bad input: {failed}")
    report["errors"] = [(e.code, e.line) for e in failed.errors.data]
    try:
        client.batches.create(input_file_id="file-000000000000000000000000",
                              endpoint="/v1/chat/completions", completion_window="24h")
        check(False, "a batch of a missing file was accepted")
    except openai.BadRequestError as e:
        report["missing_file"] = str(e)
    f = client.files.create(file=("requests.jsonl", io.BytesIO(jsonl(n))), purpose="batch")
    check(f.id.startswith("file-") and f.bytes > 0 and f.purpose == "batch", f"file {f}")
    check(client.files.retrieve(f.id).filename == "requests.jsonl", "files.retrieve")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"run": "sdk"})
    check(b.status in ("validating", "in_progress"), f"new batch is {b.status}")
    check(b.request_counts.total == n, f"total {b.request_counts}")
    with open(state_file, "w") as out:
        json.dump({"file": f.id, "batch": b.id, "cancelled": c.id}, out)
    report.update(file=f.id, batch=b.id, cancelled=c.id)

elif phase == "finish":
    with open(state_file) as inp:
        state = json.load(inp)
    listed = [b.id for b in client.batches.list(limit=100)]
    check(state["batch"] in listed and state["cancelled"] in listed, f"batches.list: {listed}")
    deadline = time.monotonic() + 120
    while True:
        b = client.batches.retrieve(state["batch"])
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        check(time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}")
        time.sleep(0.2)
    report["status"] = b.status
    report["counts"] = b.request_counts.model_dump()
    check(b.status == "completed", f"batch ended {b.status}")
    check(b.request_counts.completed == n and b.request_counts.failed == 0, f"counts {b.request_counts}")
    check(b.metadata == {"run": "sdk"}, f"metadata {b.metadata}")
    check(b.error_file_id is None, "an error file for a batch without errors")
    output = client.files.content(b.output_file_id).text
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    ids = [line["custom_id"] for line in lines]
    check(sorted(ids) == sorted(f"req-{i}" for i in range(n)), f"custom ids {ids}")
    for line in lines:
        i = int(line["custom_id"].split("-")[1])
        resp = line["response"]
        check(resp["status_code"] == 200 and line["error"] is None, f"line {line}")
        content = resp["body"]["choices"][0]["message"]["content"]
        check(resp["body"]["model"] == model or resp["body"]["model"].endswith(model), f"model {resp['body']['model']}")
        check(isinstance(content, str) and content, f"content {content!r}")
    c = client.batches.retrieve(state["cancelled"])
    report["cancelled_status"] = c.status
    check(c.status == "cancelled", f"the cancelled batch is {c.status}")
    # A file that a finished batch read may go.
    deleted = client.files.delete(state["file"])
    check(deleted.deleted, "files.delete")
    try:
        client.files.retrieve(state["file"])
        check(False, "a deleted file is still there")
    except openai.NotFoundError:
        pass
    report["output_lines"] = len(lines)

print(json.dumps(report, default=str))
