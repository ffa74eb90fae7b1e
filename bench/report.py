"""Every benchmark ends the same way: its result as JSON and as the Markdown table the README links."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable


def write_report(out: str | Path, result: dict, table: str) -> None:
    """``out`` (.json) and the same name with .md; the table is printed too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)


def measure_micro(model_dir: Path, out: str | Path, run: Callable[[], dict], table: Callable[[dict], str]) -> int:
    """A micro-world benchmark's ending: refuse without the shipped model, else measure and write both files."""
    if not (Path(model_dir) / "model_index.json").is_file():
        print("micro base model not shipped; nothing to measure", file=sys.stderr)
        return 1
    result = run()
    write_report(out, result, table(result))
    return 0


def new_judge_note(position: bool = True) -> str:
    """The one line under a table with old- and new-judge columns."""
    return ("Old judge: the judge CNN's top-1 labels alone. New judge: an object counts only where it is well formed "
            "(verdict ok: the shape that fits the object's mask best — fidelity, the best IoU with the generator's "
            "rendering of the shape, a triangle's corners free, a ring a round loop round a real hole — reaches "
            "its threshold; see microworld/fidelity.py) and the shape it names and the colour are the asked ones"
            + ("; with position: also in the place the prompt names." if position else "."))


def rate(value, digits: int = 0) -> str:
    """A share as a percentage, or — where a result (e.g. one written before the new judge) lacks it."""
    return "—" if value is None else f"{value:.{digits}%}"


def machine(threads: int | None = None) -> dict:
    """What a measurement ran on: CPU, RAM, device, threads and the library versions."""
    import diffusers
    import peft
    import torch

    def proc_field(file: str, key: str) -> str | None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError:
            return None
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)

    ram_kib = proc_field("/proc/meminfo", "MemTotal")
    return {"cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "ram_gib": round(int(ram_kib.split()[0]) / 2**20, 1) if ram_kib else None,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def describe_machine(m: dict) -> str:
    """One line for a table's header."""
    return (f"{m['cpu']} ({m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB), device {m['device']}, "
            f"{m['threads']} thread(s); torch {m['torch']}, diffusers {m['diffusers']}, peft {m['peft']}")
