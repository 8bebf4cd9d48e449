#!/usr/bin/env python3
"""A minimal OpenAI-compatible engine that holds GPU memory, for `--engine process` on a
GPU machine: it allocates GIB GiB on cuda:0 at start, answers /v1/models and one-token
/v1/completions and /v1/chat/completions, and frees everything when stopped.

  torch_engine.py --port PORT --gib GIB
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--gib", type=float, default=2.0)
p.add_argument("--model", default="torch-engine")
a = p.parse_args()
held = torch.empty(int(a.gib * (1 << 30)), dtype=torch.uint8, device="cuda:0")
held.fill_(1)
torch.cuda.synchronize()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/v1/models"):
            self.reply({"object": "list", "data": [{"id": a.model, "object": "model"}]})
        elif self.path.startswith("/health"):
            self.reply({"status": "ok"})
        else:
            self.reply({"error": "not found"}, 404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        token = int(held[0].item())
        if self.path.startswith("/v1/chat/completions"):
            self.reply({"object": "chat.completion", "model": a.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": str(token)}, "finish_reason": "length"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        elif self.path.startswith("/v1/completions"):
            self.reply({"object": "text_completion", "model": a.model, "choices": [{"index": 0, "text": str(token), "finish_reason": "length"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        else:
            self.reply({"error": "not found"}, 404)


ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()
