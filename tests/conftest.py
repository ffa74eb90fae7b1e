"""Shared fixtures: an isolated data folder and the tiny random model, built once per test session."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Isolate every test run from the user's real data folder and from the network before anything imports the stack.
_HOME = Path(tempfile.mkdtemp(prefix="atelier-test-home-"))
os.environ["ATELIER_HOME"] = str(_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def atelier_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pipelines.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


MICRO_MODEL = REPO / "assets" / "micro-sd"


@pytest.fixture(scope="session")
def default_model_dir(tiny_model_dir) -> Path:
    """What integration tests run on: the shipped micro-world model, as a user gets it (the tiny random model only
    in a checkout without it)."""
    return MICRO_MODEL if (MICRO_MODEL / "model_index.json").is_file() else tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from pipelines.loading import load_model

    return load_model(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def start_studio(model_dir: Path, outputs: Path, *extra: str):
    port = free_port()
    log = open(outputs.parent / f"studio-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--port", str(port), "--model", str(model_dir),
                             "--outputs", str(outputs), *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"studio exited early:\n{Path(log.name).read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("studio did not start within 120 s")


@pytest.fixture
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 180):
    """Run ``launch.py`` as a user would and return the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
