"""Load: several sessions on one studio at once (generate, compose, verify, upscale), against the same requests one
after another, with the server's memory sampled throughout.

    python bench/concurrent_sessions.py [--sessions 8] [--rounds 16] [--model assets/micro-sd] [--steps 10]
                                        [--same-inputs] [--out bench/results/concurrent_sessions]

One studio is started as a user starts it (``launch.py`` in a subprocess, its own data folder, the micro model; the
tiny random model when the micro model is not shipped). Session ``i`` does action ``ACTIONS[i % 4]`` with inputs
``i // 4``, so the default 8 sessions are two of each, and a pair asks for different things (other seed, other
image). Each session is one ``gradio_client.Client`` (one Gradio session) in its own thread.

1. Serial: every session's request in turn, each waiting for the previous one.
2. Concurrent, ``--rounds`` times with new sessions: all sessions submit at once (a barrier releases them together)
   and wait for their results.

Per request: submit and result times, the queue wait (from submit to the first "processing" status the client sees,
polled every 20 ms; none when the request was already finished at the first look) and success. Correct = the
concurrent result equals the serial result of the same request: generate and compose the same pixels (same seed on a
deterministic CPU run, bit for bit, no tolerance), verify the same table (matched bits, bit accuracy, p-value,
verdict), upscale the same pixels. Nothing lost = each phase saved exactly one new file per generate, compose and
upscale request into the outputs folder.

Memory: the server's resident set (RSS; its child processes included) sampled every 0.2 s with psutil: the
baseline after start, the peak during the serial phase and during each concurrent round. The serial phase comes
first and so also pays the first loads (SR model, extractor, LoRA files). Freed memory is mostly kept by the
allocator, so each phase starts at the previous one's level; bounded = the peaks level off over the rounds. Gradio
keeps every session's state until ``app.studio.SESSIONS_KEPT`` newer sessions exist, which the default 16 rounds of
8 sessions pass; and glibc gives
the queue's worker threads malloc arenas of their own (run with ``MALLOC_ARENA_MAX=2`` in the environment to see the
difference; recorded in the JSON).

What it found: the model lock was an ``RLock``, which a generator handler (Generate) may leave from another worker
thread than it entered it in; under load the release failed and every later generation hung (now a ``Lock``,
``models/cache.py``). And Gradio's default of keeping 10 000 sessions made memory climb with every session
(now ``SESSIONS_KEPT``).

Writes ``OUT.json`` (every request) and ``OUT.md`` (the table). ``tests/test_load.py`` reuses the requests, the
result reading and the sampler from here.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from report import describe_machine, machine, write_report  # noqa: E402  (bench/, the script's folder)
from studio_process import start_studio  # noqa: E402

MICRO_MODEL = REPO / "assets" / "micro-sd"
DEFAULT_OUT = REPO / "bench" / "results" / "concurrent_sessions"
ACTIONS = ("generate", "compose", "verify", "upscale")
ENDPOINTS = {"generate": "/on_generate", "compose": "/on_compose", "verify": "/on_verify", "upscale": "/on_run"}
PROMPTS = ("a red circle on the left, gray background", "a blue square in the center, white background",
           "a green triangle on the right, black background", "a yellow circle in the center, gray background")
KEY = "3fa9c0d21b7e"
STEPS = 10
SAMPLE_EVERY = 0.2
POLL_EVERY = 0.02
STARTED = ("PROCESSING", "PROGRESS", "ITERATING")


# --- the requests -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionRequest:
    """What one session asks for: an action and its inputs (``k`` picks them; equal ``k`` = equal request)."""
    session: int
    action: str
    k: int
    steps: int = STEPS
    image: str | None = None  # verify, upscale: the uploaded file

    @property
    def name(self) -> str:
        return f"{self.action}-{self.k}"

    @property
    def seed(self) -> int:
        return {"generate": 100 + self.k, "compose": 8 + self.k}.get(self.action, -1)

    @property
    def prompt(self) -> str:
        return PROMPTS[self.k % len(PROMPTS)]

    def overrides(self) -> dict[str, Any]:
        """The form fields this request sets, by their label on the page; everything else keeps the page default."""
        from gradio_client import handle_file

        if self.action == "generate":
            return {"Prompt": self.prompt, "Negative prompt": "", "Steps": self.steps, "Seed (-1 = random)": self.seed}
        if self.action == "compose":  # the tab's example composition (ring and heart) on another seed
            return {"Steps": self.steps, "Seed": self.seed}
        if self.action == "verify":
            return {"Images": [handle_file(self.image)], "Key (hex)": KEY}
        return {"Images": [handle_file(self.image)]}


def input_images(folder: Path, n: int) -> tuple[list[Path], list[Path]]:
    """``n`` distinct micro-world scenes to verify (64 px) and ``n`` small pictures to upscale (48×32 crops)."""
    from microworld.scenes import SceneConfig, generate_scene

    folder.mkdir(parents=True, exist_ok=True)
    verify, upscale = [], []
    for k in range(n):
        path = folder / f"scene{k}.png"
        generate_scene(40 + k, SceneConfig()).to_pil().save(path)
        verify.append(path)
        path = folder / f"small{k}.png"
        generate_scene(70 + k, SceneConfig()).to_pil().crop((8, 16, 56, 48)).save(path)
        upscale.append(path)
    return verify, upscale


def session_requests(sessions: int, folder: Path, steps: int = STEPS, same: bool = False) -> list[SessionRequest]:
    """Session ``i`` does ``ACTIONS[i % 4]`` with inputs ``i // 4`` (inputs 0 for every session when ``same``)."""
    per_action = 1 if same else -(-sessions // len(ACTIONS))
    verify, upscale = input_images(folder, per_action)
    requests = []
    for i in range(sessions):
        action, k = ACTIONS[i % len(ACTIONS)], 0 if same else i // len(ACTIONS)
        image = {"verify": verify, "upscale": upscale}.get(action)
        requests.append(SessionRequest(i, action, k, steps, str(image[k]) if image else None))
    return requests


def endpoint_args(api: dict, request: SessionRequest) -> list:
    """The endpoint's positional arguments: page defaults with the request's fields set (each label must match)."""
    params = api["named_endpoints"][ENDPOINTS[request.action]]["parameters"]
    overrides = request.overrides()
    found = {p["label"] for p in params}
    missing = sorted(set(overrides) - found)
    if missing:
        raise RuntimeError(f"{ENDPOINTS[request.action]} has no field labelled {', '.join(missing)}")
    return [overrides.get(p["label"], p.get("parameter_default")) for p in params]


# --- reading a result ---------------------------------------------------------------------------------------------
def pixels_digest(path: str | Path) -> str:
    """sha256 of an image's size and RGB pixels (not of its file: PNG metadata may carry times)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return hashlib.sha256(repr(rgb.shape).encode() + rgb.tobytes()).hexdigest()


def verify_rows(rows: list[list]) -> list[list[str]]:
    """A verify table without the image's name (an upload's name is Gradio's, not the user's)."""
    return [[str(v) for v in row[1:]] for row in rows]


def signature(action: str, result: tuple) -> dict:
    """What must not differ between two runs of the same request, read from the endpoint's return value."""
    if action == "generate":
        gallery, status, _ = result
        if not gallery or "Saved" not in status:
            raise RuntimeError(f"no image: {status!r}")
        return {"pixels": pixels_digest(gallery[0]["image"])}
    if action == "compose":
        image, _, status = result
        if not image or "Saved" not in status:
            raise RuntimeError(f"no image: {status!r}")
        return {"pixels": pixels_digest(image)}
    if action == "verify":
        summary, table = result
        table = (table or {}).get("value", table)  # the tab answers with gr.update(value=…, headers=…)
        if not table or not table.get("data"):
            raise RuntimeError(f"no table: {summary!r}")
        return {"summary": summary, "rows": verify_rows(table["data"])}
    _, gallery, status = result
    if not gallery or "Upscaled 1" not in status:
        raise RuntimeError(f"no image: {status!r}")
    return {"pixels": pixels_digest(gallery[0]["image"])}


# --- running the requests -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    session: int
    action: str
    request: str
    submitted: float  # seconds since the phase started
    finished: float
    queue_wait: float | None
    ok: bool
    signature: dict | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.finished - self.submitted


class Session:
    """One Gradio session: a client of its own and the endpoint arguments for its request."""

    def __init__(self, url: str, request: SessionRequest) -> None:
        from gradio_client import Client

        self.request = request
        self.client = Client(url, verbose=False)
        self.args = endpoint_args(self.client.view_api(return_format="dict", print_info=False), request)

    def run(self, t0: float) -> Outcome:
        submitted = time.perf_counter() - t0
        job = self.client.submit(*self.args, api_name=ENDPOINTS[self.request.action])
        started = None
        while not job.done():
            if started is None and job.status().code.name in STARTED:
                started = time.perf_counter() - t0
            time.sleep(POLL_EVERY)
        r = self.request
        try:
            result = job.result()
            finished = time.perf_counter() - t0
            sig = signature(r.action, result)
        except Exception as exc:  # a failed request is a result here: reported, counted, not raised
            return Outcome(r.session, r.action, r.name, submitted, time.perf_counter() - t0, None, False,
                           error=f"{exc.__class__.__name__}: {str(exc)[:300]}")
        wait = None if started is None else started - submitted
        return Outcome(r.session, r.action, r.name, submitted, finished, wait, True, sig)


def run_serial(sessions: list[Session]) -> list[Outcome]:
    t0 = time.perf_counter()
    return [s.run(t0) for s in sessions]


def run_concurrent(sessions: list[Session]) -> list[Outcome]:
    """Every session submits at once (one thread each) and waits for its own result."""
    outcomes: list[Outcome | None] = [None] * len(sessions)
    start = [0.0]
    barrier = threading.Barrier(len(sessions), action=lambda: start.__setitem__(0, time.perf_counter()))

    def one(i: int) -> None:
        barrier.wait()
        outcomes[i] = sessions[i].run(start[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in outcomes if o is not None]


def compare(serial: list[Outcome], concurrent: list[Outcome]) -> dict[str, bool]:
    """request name → concurrent result equals the serial one (both succeeded)."""
    reference = {o.request: o.signature for o in serial if o.ok}
    return {o.request: o.ok and o.request in reference and o.signature == reference[o.request] for o in concurrent}


# --- memory -------------------------------------------------------------------------------------------------------
class RssSampler:
    """The RSS of a process and its children, sampled every ``every`` s in a thread; ``mark`` names a phase."""

    def __init__(self, pid: int, every: float = SAMPLE_EVERY) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, str, int]] = []  # (time, phase, bytes)
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()

    def rss(self) -> int:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, self.phase, self.rss()))
            self._stop.wait(self.every)

    def mark(self, phase: str) -> None:
        self.samples.append((time.perf_counter() - self._t0, self.phase, self.rss()))
        self.phase = phase

    def peak(self, phase: str) -> int:
        return max((b for _, p, b in self.samples if p == phase), default=0)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.mark("end")
        self._stop.set()
        self._thread.join()


def mib(n: int) -> float:
    return round(n / 2**20, 1)


# --- the studio ---------------------------------------------------------------------------------------------------
def saved_files(outputs: Path) -> set[Path]:
    """The images the studio saved: generated and composed PNGs, and the upscaled ones."""
    return set(outputs.glob("*.png")) | set((outputs / "upscaled").glob("*.png"))


def sessions_kept() -> int:
    """How many sessions the studio keeps in memory (``app.studio.SESSIONS_KEPT``)."""
    from app.studio import SESSIONS_KEPT

    return SESSIONS_KEPT


def expected_saves(requests: list[SessionRequest]) -> int:
    return sum(r.action != "verify" for r in requests)


# --- the measurement ----------------------------------------------------------------------------------------------
def measure(model: Path, sessions: int, steps: int, rounds: int = 2, same: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="atelier-load-"))
    outputs = work / "outputs"
    requests = session_requests(sessions, work / "inputs", steps, same)
    env = {**os.environ, "ATELIER_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    proc, url = start_studio(model, outputs, env=env, timeout=180)
    concurrent: list[list[Outcome]] = []
    walls: list[float] = []
    saved: list[int] = []
    try:
        with RssSampler(proc.pid) as memory:
            time.sleep(1.0)
            memory.mark("baseline")
            time.sleep(1.0)
            clients = [Session(url, r) for r in requests]
            print(f"serial: {len(clients)} requests …", file=sys.stderr, flush=True)
            memory.mark("serial")
            t = time.perf_counter()
            serial = run_serial(clients)
            serial_wall = time.perf_counter() - t
            memory.mark("between")
            before = saved_files(outputs)
            saved_serial = len(before)
            for n in range(rounds):
                clients = [Session(url, r) for r in requests]  # new sessions for every round
                print(f"concurrent round {n + 1}: {len(clients)} sessions at once …", file=sys.stderr, flush=True)
                memory.mark(f"concurrent {n + 1}")
                t = time.perf_counter()
                concurrent.append(run_concurrent(clients))
                walls.append(time.perf_counter() - t)
                memory.mark("between")
                now = saved_files(outputs)
                saved.append(len(now - before))
                before = now
            answers = Session(url, requests[0]).run(time.perf_counter()).ok  # the server still answers
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    peaks = {"baseline": memory.peak("baseline"), "serial": memory.peak("serial"),
             "concurrent": [memory.peak(f"concurrent {n + 1}") for n in range(rounds)]}
    result = {
        "date": date.today().isoformat(), "machine": machine(), "model": str(model), "sessions": sessions,
        "rounds": rounds, "same_inputs": same, "steps": steps, "server_threads": "torch default (every core)",
        "serial_wall_s": round(serial_wall, 2), "concurrent_wall_s": [round(w, 2) for w in walls],
        "saved": {"expected_per_phase": expected_saves(requests), "serial": saved_serial, "concurrent": saved},
        "server_answers_afterwards": answers, "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "sessions_kept": sessions_kept(), "sessions_opened": sessions * (rounds + 1) + 1,
        "rss_mib": {"baseline": mib(peaks["baseline"]), "serial_peak": mib(peaks["serial"]),
                    "concurrent_peak": [mib(p) for p in peaks["concurrent"]]},
        "rss_peak_ratio_concurrent_over_serial": round(max(peaks["concurrent"]) / peaks["serial"], 3),
        "requests": [asdict(r) for r in requests],
        "serial": [{**asdict(o), "latency": round(o.latency, 3)} for o in serial],
        "concurrent": [[{**asdict(o), "latency": round(o.latency, 3), "correct": compare(serial, one)[o.request]}
                        for o in one] for one in concurrent],
        "rss_samples": [f"{t:.1f} s {p} {mib(b)} MiB" for t, p, b in memory.samples],
        "command": " ".join(["python", "bench/concurrent_sessions.py", *sys.argv[1:]]),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def all_correct(result: dict) -> bool:
    return all(o["correct"] for one in result["concurrent"] for o in one)


def table(result: dict) -> str:
    serial, rounds, rss = result["serial"], result["concurrent"], result["rss_mib"]
    lines = [
        "# Concurrent sessions on one studio",
        "",
        f"{describe_machine(result['machine'])}. Model `{Path(result['model']).name}`, {result['steps']} steps. "
        f"{result['sessions']} sessions (one `gradio_client.Client` each) run their requests one after another "
        f"(serial), then all at once (concurrent), {result['rounds']} rounds with new sessions; "
        f"`{result['command']}`, {result['date']}.",
        "",
        "| action | sessions at once | serial s | concurrent wall s | mean latency s | max latency s "
        "| mean queue wait s | all correct? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for action in [*ACTIONS, "all"]:
        s = [o for o in serial if action in (o["action"], "all")]
        per_round = [[o for o in one if action in (o["action"], "all")] for one in rounds]
        c = [o for one in per_round for o in one]
        if not c:
            continue
        wall = statistics.mean(max(o["finished"] for o in one) - min(o["submitted"] for o in one)
                               for one in per_round)
        waits = [o["queue_wait"] for o in c if o["queue_wait"] is not None]
        wait = f"{statistics.mean(waits):.2f}" if waits else "–"
        ok = sum(o["correct"] for o in c)
        lines.append(f"| {action} | {len(per_round[0])} | {sum(o['latency'] for o in s):.1f} | {wall:.1f} | "
                     f"{statistics.mean(o['latency'] for o in c):.1f} | {max(o['latency'] for o in c):.1f} | "
                     f"{wait} | {'yes' if ok == len(c) else 'no'} ({ok}/{len(c)}) |")
    saved = result["saved"]
    half = result["rounds"] // 2
    peaks = rss["concurrent_peak"]
    lines += [
        "",
        f"Server memory (RSS of the studio process and its children, MiB): baseline {rss['baseline']:.0f}, "
        f"peak serial {rss['serial_peak']:.0f}, peak concurrent {max(peaks):.0f} "
        f"({result['rss_peak_ratio_concurrent_over_serial']:.2f} × serial)"
        + (f"; highest peak in rounds 1–{half} {max(peaks[:half]):.0f}, in rounds {half + 1}–{len(peaks)} "
           f"{max(peaks[half:]):.0f}" if half else "")
        + f"; {result['sessions_opened']} sessions opened in all, the studio keeps {result['sessions_kept']}.",
        "",
        "| phase | wall s | peak RSS MiB | images saved (expected) | correct |",
        "|---|---|---|---|---|",
        f"| serial | {result['serial_wall_s']:.1f} | {rss['serial_peak']:.0f} | {saved['serial']} "
        f"({saved['expected_per_phase']}) | – |",
    ]
    for n, one in enumerate(rounds):
        ok = sum(o["correct"] for o in one)
        lines.append(f"| concurrent round {n + 1} | {result['concurrent_wall_s'][n]:.1f} | {peaks[n]:.0f} | "
                     f"{saved['concurrent'][n]} ({saved['expected_per_phase']}) | {ok}/{len(one)} |")
    lines += [
        "",
        f"The server answered a request after the last round: {'yes' if result['server_answers_afterwards'] else 'NO'}"
        + (f". Allocator: MALLOC_ARENA_MAX={result['malloc_arena_max']}" if result.get("malloc_arena_max") else "")
        + ".",
        "",
        "Correct = the concurrent result equals the serial result of the same request: generate and compose the "
        "same pixels bit for bit (no tolerance), verify the same matched bits, bit accuracy, p-value and verdict, "
        "upscale the same pixels. Latency = from submit to result, summed over the requests for serial s; "
        "the queue wait = from submit to the first \"processing\" status the client saw (polled every 20 ms). "
        "Generate and compose share one queue slot (the model), verify and upscale have one slot each, so at most "
        "three requests run at a time, sharing the machine's cores. RSS is sampled every 0.2 s; the serial phase "
        "runs first and also pays the first loads (SR model, extractor, LoRA files); freed memory mostly stays "
        "with the allocator, so each phase starts at the previous one's level. Gradio keeps each session's state "
        f"until {result['sessions_kept']} newer sessions exist (`app.studio.SESSIONS_KEPT`; Gradio's default is "
        "10 000), and glibc gives the queue's worker threads malloc arenas of their own (compare a run with "
        "`MALLOC_ARENA_MAX=2` in the environment). Bounded = the per-round peaks stop rising over the last rounds.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8, help="sessions held at once (default 8: two per action)")
    parser.add_argument("--model", help="model folder (default: the shipped micro model, else the tiny one)")
    parser.add_argument("--steps", type=int, default=STEPS, help="denoising steps of generate and compose")
    parser.add_argument("--rounds", type=int, default=16, help="concurrent rounds (new sessions each)")
    parser.add_argument("--same-inputs", action="store_true",
                        help="every session of an action asks for the same thing (as users who keep the defaults)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.rounds < 1:
        parser.error("--sessions and --rounds must be at least 1")
    if args.model:
        model = Path(args.model)
    elif (MICRO_MODEL / "model_index.json").is_file():
        model = MICRO_MODEL
    else:
        from models.tiny_model import ensure_tiny_model

        model = ensure_tiny_model(Path(tempfile.gettempdir()) / "atelier-bench" / "tiny")
        print("micro model not shipped: the tiny random model (compose's example LoRAs will not fit)",
              file=sys.stderr)
    result = measure(model.resolve(), args.sessions, args.steps, args.rounds, args.same_inputs)
    write_report(Path(args.out).with_suffix(".json"), result, table(result))
    return 0 if all_correct(result) else 1


if __name__ == "__main__":
    sys.exit(main())
