"""Saves replace a file in one step: a failed save keeps the old file and leaves nothing behind; modes follow umask."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from core.atomic_files import replacing, write_text
from core.png_metadata import save_png_with_parameters
from core.safetensors_files import save_atomic


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "run.json", "old")
    with pytest.raises(OSError, match="disk full"):
        with replacing(target) as tmp:
            tmp.write_text("half of the ne", encoding="utf-8")
            raise OSError("disk full")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_failed_adapter_save_keeps_the_previous_adapter(tmp_path):
    path = save_atomic({"w": torch.ones(2)}, tmp_path / "a.safetensors", {"atelier.method": "lora"})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_atomic({"w": object()}, path)  # not a tensor: fails inside the write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_saved_files_get_the_permissions_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        paths = [save_atomic({"w": torch.ones(1)}, tmp_path / "a.safetensors"), write_text(tmp_path / "b.json", "{}"),
                 save_png_with_parameters(Image.new("RGB", (4, 4)), tmp_path / "c.png", "prompt")]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name  # mkstemp would have made them 0600


def test_two_saves_to_one_name_use_separate_temporaries(tmp_path):
    with replacing(tmp_path / "x.txt") as first, replacing(tmp_path / "x.txt") as second:
        assert first != second
        first.write_text("1", encoding="utf-8")
        second.write_text("2", encoding="utf-8")
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == "1"  # the outer block ends last
