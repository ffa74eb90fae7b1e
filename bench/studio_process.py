"""The studio as a process of its own on a free localhost port: what the browser tests and the load benchmark start."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(model: Path, outputs: Path, *extra: str, env: dict[str, str] | None = None,
                 timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """``launch.py --model MODEL --outputs OUTPUTS EXTRA…``; returns the process and its URL once the page answers.
    Its output goes to ``studio-PORT.log`` beside the outputs folder."""
    port = free_port()
    outputs.parent.mkdir(parents=True, exist_ok=True)
    log_path = outputs.parent / f"studio-{port}.log"
    with open(log_path, "w") as log:  # the process keeps its own copy of the handle
        proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--port", str(port), "--model", str(model),
                                 "--outputs", str(outputs), *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env if env is not None else os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"studio exited early:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"studio did not start within {timeout:.0f} s")
