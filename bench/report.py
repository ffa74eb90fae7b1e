"""Every benchmark ends the same way: its result as JSON and as the Markdown table the README links."""
from __future__ import annotations

import json
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
