"""Shared fixtures: an isolated data folder and the tiny random model, built once per test session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.studio_process import free_port, start_studio  # noqa: E402,F401  (re-exported to the tests)

# Isolate every test run from the user's real data folder and from the network before anything imports the stack.
_HOME = Path(tempfile.mkdtemp(prefix="atelier-test-home-"))
os.environ["ATELIER_HOME"] = str(_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs one worker per core) each worker and the processes it starts use one thread,
# so the workers do not fight over the cores; the small models gain little from intra-op threads anyway.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Slow tests first: under xdist the longest ones then start at once on different workers and the short ones
    fill in around them, instead of a long test starting last and running alone. Tests marked ``long`` (many
    CPU-minutes) are skipped unless ATELIER_LONG_TESTS=1 (``make test-long``)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if os.environ.get("ATELIER_LONG_TESTS") != "1":
        skip = pytest.mark.skip(reason="long test: run with make test-long (ATELIER_LONG_TESTS=1)")
        for item in items:
            if item.get_closest_marker("long"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def atelier_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from models.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline (two text encoders, pooled embeddings, time ids) saved as a diffusers folder."""
    from models.tiny_model import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    """A tiny random SD 2.x pipeline: v-prediction on a zero-terminal-SNR schedule."""
    from models.tiny_model import build_tiny_sd2_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sd2"
    build_tiny_sd2_pipeline(zero_terminal_snr=True).save_pretrained(folder, safe_serialization=True)
    return folder


MICRO_MODEL = REPO / "assets" / "micro-sd"


@pytest.fixture(scope="session")
def default_model_dir(tiny_model_dir) -> Path:
    """What integration tests run on: the shipped micro-world model, as a user gets it (the tiny random model only
    in a checkout without it)."""
    return MICRO_MODEL if (MICRO_MODEL / "model_index.json").is_file() else tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from models.loading import load_model

    return load_model(tiny_model_dir)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by its path relative to it (temporaries included); {} when absent."""
    import hashlib

    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def disk_full_after_one_job_record(monkeypatch) -> list[Path]:
    """The job queue's record writer writes one record, then fails as a full disk does; returns the written paths."""
    import errno

    import trainers.jobs as jobs

    real_write, written = jobs._write_json, []

    def full_at_the_second(path, data):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)
        written.append(path)

    monkeypatch.setattr(jobs, "_write_json", full_at_the_second)
    return written


def wait_for(predicate, timeout: float = 180, every: float = 0.3):
    """``predicate()``'s first truthy value, polled every ``every`` seconds; TimeoutError after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not reached")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@contextmanager
def running_studio(model_dir: Path, outputs: Path, *extra: str):
    """The studio in a subprocess for a block; yields its URL and stops it afterwards."""
    proc, url = start_studio(model_dir, outputs, *extra)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_tab(browser, url: str, tab: str | None = None, width: int = 1400, height: int = 1000):
    """A new page on the studio, with ``tab`` selected."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    if tab:
        page.get_by_role("tab", name=tab).click()
    return page


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


def number(page, elem_id: str):
    """The typed box of a Gradio number or slider component."""
    return page.locator(f"#{elem_id} input[type=number]")


def pick(page, elem_id: str, option) -> None:
    """Choose ``option`` in the Gradio dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).click()


def type_number(page, elem_id: str, value) -> None:
    """Type ``value`` into a number or slider component and leave it, as a user does (the change event fires)."""
    box = number(page, elem_id)
    box.fill(str(value))
    box.press("Tab")


def upload(page, elem_id: str, paths, timeout_ms: int = 30_000) -> None:
    """Give files to a Gradio file component and wait until each one's name is listed (the upload has arrived)."""
    paths = [str(p) for p in paths]
    page.locator(f"#{elem_id} input[type=file]").set_input_files(paths)
    for path in paths:
        page.locator(f'#{elem_id} td.filename[aria-label="{Path(path).name}"]').wait_for(timeout=timeout_ms)


def run_compose(page, timeout_ms: int) -> None:
    """Click Compose and wait until the status says Saved and both result images have loaded."""
    page.locator("#compose-run").click()
    page.wait_for_function("document.querySelector('#compose-status')?.innerText.includes('Saved')", timeout=timeout_ms)
    page.wait_for_function("(() => ['compose-result', 'compose-overlay'].every(id => { "
                           "const i = document.querySelector('#' + id + ' img'); "
                           "return i && i.complete && i.naturalWidth > 0; }))()", timeout=15_000)


def compose_canvas_point(page, fx: float, settle_ms: int = 500) -> tuple[float, float, float]:
    """(x, y, scale) on the page of the point ``fx`` of the way across the Compose tab's default 128×64 canvas, at its
    middle height; ``scale`` turns the canvas' 512-pixel drawing into page pixels."""
    canvas = page.locator("#compose-canvas canvas").first
    canvas.wait_for()
    page.wait_for_timeout(settle_ms)
    bb = canvas.bounding_box()
    scale = bb["height"] / 256  # the 128×64 canvas is drawn 512×256, centred
    left = bb["x"] + (bb["width"] - 512 * scale) / 2
    return left + fx * 512 * scale, bb["y"] + bb["height"] / 2, scale


def fill_train_form(page, data: Path, *, steps: int, images: int, name: str, batch: int | None = None) -> None:
    """Fill the Train tab's shared fields and wait for the arithmetic line that confirms the dataset was read."""
    page.locator("#train-folder textarea, #train-folder input").first.fill(str(data))
    page.locator("#train-trigger textarea, #train-trigger input").first.fill("sks")
    if batch is not None:
        page.locator("#train-batch input").fill(str(batch))
    steps_box = page.locator("#train-steps input")
    steps_box.fill(str(steps))
    steps_box.press("Tab")
    page.locator("#train-ckpt-every input").fill("1000")
    page.locator("#train-name textarea, #train-name input").first.fill(name)
    expected = f"{images} images × 1 repeats ÷ batch {batch or 1}"
    page.wait_for_function(f"document.querySelector('#train-arithmetic textarea')?.value.includes('{expected}')",
                           timeout=30_000)


def run_torchrun(*args: str, timeout: float = 300):
    """``torchrun --nproc_per_node 2 launch.py ARGS`` (CPU, gloo), or None when torchrun is not installed."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        return None
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", str(REPO / "launch.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=os.environ.copy())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Five drawn red circles with captions: the in-process training tests' dataset."""
    from training_data import draw_dataset

    return draw_dataset(tmp_path_factory.mktemp("data") / "circles", n=5)


def one_and_two_processes(common: list[str], tmp_path: Path):
    """The same ``launch.py`` training in one process and under torchrun with two (run folders r1, r2)."""
    one = run_cli(*common, "--out", str(tmp_path / "one.safetensors"), "--run-dir", str(tmp_path / "r1"))
    assert one.returncode == 0, one.stderr
    two = run_torchrun(*common, "--out", str(tmp_path / "two.safetensors"), "--run-dir", str(tmp_path / "r2"))
    if two is None:
        pytest.skip("torchrun not found")
    assert two.returncode == 0, two.stderr[-2000:]


@pytest.fixture
def fresh_accelerator_state():
    """Jobs run one training per process; in-process tests reset accelerate's per-process singleton instead."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    yield


def run_cli(*args: str, env: dict | None = None, timeout: float = 180):
    """Run ``launch.py`` as a user would and return the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory):
    """The bad-input corpus (tests/bad_inputs.py), written once per session: broken images, adapters, SR models,
    composition specs, prompts, keys, a mixed dataset folder and hostile file names."""
    from bad_inputs import build_corpus

    return build_corpus(tmp_path_factory.mktemp("bad"))
