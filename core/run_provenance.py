"""Where an adapter file came from: the metadata keys the training run loop stamps into every artefact it ends with,
and a run folder's last preview sample (the Library's thumbnail).

At the bottom layer so the Library (``adapters``) reads what the trainers write without importing them. The event
log's shape is :mod:`trainers.events`' (one JSON object a line; ``sample`` events list image paths relative to the
run folder, the base model's row marked ``base``); ``tests/test_library.py`` writes it with the trainers' own
``EventLog`` so the two cannot drift apart.
"""
from __future__ import annotations

import json
from pathlib import Path

RUN_DIR_KEY = "atelier.run_dir"  # the run folder, absolute
STEPS_KEY = "atelier.steps"  # the steps the run reached
CREATED_KEY = "atelier.created"  # when the run ended with the file, YYYY-MM-DDTHH:MM:SS (local time)
RUN_EVENTS = "events.jsonl"  # trainers.events.EVENTS


def last_preview(run_dir: Path) -> Path | None:
    """The first existing image of the run's newest preview sample, or None (no run folder, no previews yet, or only
    the base model's row, which shows the model before training, not the adapter)."""
    path = Path(run_dir) / RUN_EVENTS
    if not path.is_file():
        return None
    found = None
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.endswith("\n") or '"sample"' not in line:  # a line still being written; not a sample
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict) or event.get("event") != "sample" or event.get("base"):
                    continue
                images = [Path(run_dir) / str(p) for p in event.get("paths") or []]
                found = next((image for image in images if image.is_file()), found)
    except OSError:
        return None
    return found
