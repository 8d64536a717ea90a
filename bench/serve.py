"""Start the real app (``python app.py``) on a loopback port and wait until it answers.

Shared by the tests (the ``app_url`` fixture), the browser benchmark and the
load test, so that all three run the app exactly as a user does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_app(port: int, log: Path | None = None, timeout_s: float = 180,
              extra_env: dict | None = None) -> subprocess.Popen:
    """``app.py --host 127.0.0.1 --port PORT`` as a subprocess, offline; returns once it serves.

    Output goes to ``log`` (or nowhere). Raises ``RuntimeError`` with the log's
    tail if the app exits or does not answer within ``timeout_s``.
    """
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           **(extra_env or {})}
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", HOST,
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                tail = log.read_text()[-3000:] if log is not None else "(no log kept)"
                raise RuntimeError(f"the app did not start; log:\n{tail}") from None
            time.sleep(0.5)


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
