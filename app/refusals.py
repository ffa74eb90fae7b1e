"""A user's mistake, refused on the page and as one line in the studio's log.

Gradio prints a full traceback for every ``gr.Error`` by default; for the studio's log a refusal is not a bug, so it
is one line there, and the traceback comes back with ``ATELIER_DEBUG`` set (as for the CLI).
"""
from __future__ import annotations

import os
import sys

import gradio as gr


def debugging() -> bool:
    return bool(os.environ.get("ATELIER_DEBUG"))


def refusal(message: str) -> gr.Error:
    """The error to raise for a refused request: ``raise refusal("Choose a file.")``."""
    debug = debugging()
    if not debug:
        first = message.strip().splitlines()[0] if message.strip() else "refused"
        print(f"refused: {first}", file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=debug)
