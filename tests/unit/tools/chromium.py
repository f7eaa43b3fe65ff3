"""Load a page in headless Chromium and report what a reader's browser would: console messages, uncaught
exceptions, failed loads (Log domain), broken images, and a screenshot.

Talks the DevTools protocol over `--remote-debugging-pipe` (fd 3: commands in, fd 4: replies out, each a
JSON message ended by a NUL byte): no port, no websocket library, and every console message is caught,
unlike scraping `--enable-logging=stderr`, which leaves out failed resource loads.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@dataclass
class PageLoad:
    errors: list[str] = field(default_factory=list)     # console errors, exceptions, failed loads
    messages: list[str] = field(default_factory=list)   # every console and log message
    broken_images: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    title: str = ""


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int):
        self.proc, self.w, self.r = proc, to_browser, from_browser
        self.buf, self.next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read_one(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        want = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_one(deadline)
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, msg in enumerate(self.events):
            if msg.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._read_one(deadline)
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_one(deadline))
        except TimeoutError:
            pass


def _collect(events: list[dict], result: PageLoad) -> None:
    for msg in events:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            result.messages.append(f"console.{p.get('type')}: {text}")
            if p.get("type") in ("error", "assert"):
                result.errors.append(result.messages[-1])
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            result.errors.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            result.messages.append(f"log.{e.get('level')}: {e.get('text')} {e.get('url', '')}")
            if e.get("level") == "error":
                result.errors.append(result.messages[-1])


def _evaluate(pipe: _Pipe, session: str, expression: str):
    return pipe.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                     session=session)["result"].get("value")


def load_pages(pages: list[Path], width: int = 1280, height: int = 2000, timeout: float = 60.0) -> list[PageLoad]:
    """Open each file://PAGE in one headless Chromium, let it settle, and collect what a reader would see."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium")
    cmd_r, cmd_w = os.pipe()    # we write commands to cmd_w; the browser reads fd 3
    out_r, out_w = os.pipe()    # the browser writes fd 4; we read out_r

    def as_fds_3_and_4():  # in the child; via fds above 4 so that neither dup2 overwrites the other's source
        high_r, high_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    profile = tempfile.mkdtemp(prefix="phalanx-chromium-")
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", f"--user-data-dir={profile}",
         f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=as_fds_3_and_4, pass_fds=(3, 4))
    os.close(cmd_r)
    os.close(out_w)
    pipe, results = _Pipe(proc, cmd_w, out_r), []
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        for page in pages:
            pipe.events.clear()
            result = PageLoad()
            pipe.call("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout=timeout)
            pipe.drain(0.5)  # messages logged just after the load event
            result.broken_images = json.loads(_evaluate(pipe, session, (
                "JSON.stringify(Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                ".map(i => i.src.slice(0, 80)))")))
            result.title = _evaluate(pipe, session, "document.title") or ""
            shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
            result.screenshot = base64.b64decode(shot["data"])
            _collect(pipe.events, result)
            results.append(result)
        pipe.send("Browser.close")
        return results
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(cmd_w)
        os.close(out_r)
        shutil.rmtree(profile, ignore_errors=True)
