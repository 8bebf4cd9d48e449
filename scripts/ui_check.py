#!/usr/bin/env python3
"""Drives the status page in a real browser: headless Chromium (Debian's package) over
the DevTools protocol (PyPI websocket-client), against a running `greenthread local`.

    ui_check.py URL SCREENSHOT [ADMIN_TOKEN]

Checks, each with a deadline: the page loads with no console error and no uncaught
exception; it lists the four default models, all sleeping; a chat request to one makes
its row say `serving` within two seconds of the answer; a second model on the same GPU
preempts it and the event log names the preemptor; the second model's Sleep button,
pressed from the keyboard, puts it back to sleep; with ADMIN_TOKEN the page first asks for the
token and works once it is entered. Saves a screenshot at SCREENSHOT and prints one
JSON line (what it saw)."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websocket  # websocket-client

URL, SHOT = sys.argv[1], sys.argv[2]
TOKEN = sys.argv[3] if len(sys.argv) > 3 else None
MODELS = ["llama-8b", "mistral-7b", "phi-mini", "qwen-7b"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="gt-chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                shutil.which("chromium") or "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                f"--user-data-dir={self.dir}",
                f"--remote-debugging-port={port}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pages = until("chromium's DevTools endpoint", 30, lambda: json.load(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2)))
        page = next(p for p in pages if p["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0
        self.errors = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _event(self, m):
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(p["exceptionDetails"].get("exception", {}).get("description")
                               or p["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(p["entry"]["text"])

    def call(self, method, **params):
        self.next_id += 1
        me = self.next_id
        self.ws.send(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv())
            if m.get("id") == me:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._event(m)

    def pump(self):
        """Reads the events that arrived meanwhile (console errors)."""
        self.call("Runtime.evaluate", expression="0")

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def key(self, key, code, vk):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code,
                      windowsVirtualKeyCode=vk, text="\r" if key == "Enter" and kind == "keyDown" else "")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)


def until(what, seconds, probe):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            v = probe()
            if v:
                return v
            last = v
        except Exception as e:  # not there yet
            last = e
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what} (last: {last!r})")


ROW_STATES = """Object.fromEntries([...document.querySelectorAll('#models tbody tr')]
  .map(r => [r.dataset.model, r.querySelector('.state').textContent]))"""


def main():
    b = Browser()
    seen = {}
    try:
        b.call("Page.navigate", url=URL)
        if TOKEN:
            until("the page to ask for the admin token", 10,
                  lambda: b.js("!document.getElementById('login').hidden"))
            seen["asked_for_token"] = True
            # The browser reports the refused reads that made the page ask; nothing else.
            b.pump()
            assert all("status of 401" in e for e in b.errors), b.errors
            b.errors.clear()
            b.js(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
            b.js("document.querySelector('#login button').click()")
        states = until("the four default models, all sleeping", 60, lambda: (
            lambda s: s if sorted(s) == MODELS and set(s.values()) == {"sleeping"} else None)(b.js(ROW_STATES)))
        seen["initial"] = states
        seen["gpu_cards"] = b.js("document.querySelectorAll('#gpus .card').length")
        assert seen["gpu_cards"] >= 1, seen

        # A chat request wakes llama-8b; the page shows it within two seconds of the answer.
        headers = {"content-type": "application/json"}
        if TOKEN:
            headers["authorization"] = f"Bearer {TOKEN}"
        body = json.dumps({"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 4}).encode()
        req = urllib.request.Request(f"{URL}/v1/chat/completions", body, headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200, r.status
        answered = time.monotonic()
        until("llama-8b to show serving", 2, lambda: b.js(ROW_STATES).get("llama-8b") == "serving")
        seen["serving_after_seconds"] = round(time.monotonic() - answered, 3)
        # The row's last wake is the sidecar's own account, with its longest phases.
        seen["last_wake_cell"] = until("llama-8b's last wake with its phases", 3, lambda: (
            lambda t: t if "engine wake" in t else None)(b.js(
                "document.querySelector('tr[data-model=\"llama-8b\"] td:nth-of-type(7)').textContent")))
        until("the wake in the event log", 2,
              lambda: "llama-8b: woke in" in b.js("document.getElementById('log').textContent"))

        # mistral-7b shares GPU 0 with llama-8b and does not fit beside it: once llama-8b
        # has served its minRuntime (10 s), it is preempted, and the log says by whom.
        other = {}

        def ask_mistral():
            req = urllib.request.Request(f"{URL}/v1/chat/completions",
                                         body.replace(b"llama-8b", b"mistral-7b"), headers)
            with urllib.request.urlopen(req, timeout=120) as r:
                other["status"] = r.status

        t = threading.Thread(target=ask_mistral)
        t.start()
        until("the preemption in the event log", 30,
              lambda: "llama-8b: preempted by mistral-7b" in b.js("document.getElementById('log').textContent"))
        until("mistral-7b to show serving", 30, lambda: b.js(ROW_STATES).get("mistral-7b") == "serving")
        t.join(30)
        assert other.get("status") == 200, other
        seen["preemption_logged"] = True

        # The Sleep button, from the keyboard: focus it, press Enter.
        label = b.js("document.querySelector('tr[data-model=\"mistral-7b\"] button.sleep').getAttribute('aria-label')")
        assert label == "Sleep mistral-7b", label
        b.js("document.querySelector('tr[data-model=\"mistral-7b\"] button.sleep').focus()")
        b.key("Enter", "Enter", 13)
        until("mistral-7b to show sleeping again", 15, lambda: b.js(ROW_STATES).get("mistral-7b") == "sleeping")
        seen["after_sleep"] = b.js(ROW_STATES)["mistral-7b"]

        # The picture: another model serving, its GPU's record read again (at most once
        # a second), at a desktop width.
        req = urllib.request.Request(f"{URL}/v1/chat/completions", body.replace(b"llama-8b", b"phi-mini"), headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200, r.status
        until("phi-mini's memory on its GPU card", 5, lambda: b.js(
            "[...document.querySelectorAll('#gpus .card')].some(c => c.textContent.includes('phi-mini-0 (serving)'))"))
        shot = b.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        os.makedirs(os.path.dirname(os.path.abspath(SHOT)), exist_ok=True)
        with open(SHOT, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

        # Readable in a narrow window: nothing wider than the viewport (the models table
        # scrolls inside its own box).
        b.call("Emulation.setDeviceMetricsOverride", width=400, height=800, deviceScaleFactor=1, mobile=False)
        seen["narrow_overflow"] = b.js("document.documentElement.scrollWidth - window.innerWidth")
        assert seen["narrow_overflow"] <= 0, seen
        b.pump()
        seen["console_errors"] = sorted(set(b.errors))
        assert not b.errors, seen["console_errors"][:5]
    finally:
        b.close()
    print(json.dumps(seen))


main()
