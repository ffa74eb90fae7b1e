"""Every benchmark ends the same way: its result as JSON and as the Markdown table the README links."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path, result: dict, table: str) -> None:
    """``out`` (.json) and the same name with .md; the table is printed too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
