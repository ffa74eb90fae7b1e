"""Verification: verdicts per image and pooled, which key, robustness rows, refusals, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from core.errors import UserError
from pipelines.watermark.extractor import BitExtractor, ExtractorConfig, extractor_hash, save_extractor
from pipelines.watermark.keys import parse_key
from pipelines.watermark.stats import p_value, threshold
from pipelines.watermark.verify import identify, key_from_adapter, load_image, open_extractor, robustness, verify

KEY = "a5a5c3c30f0f"


class ReadsKey(BitExtractor):
    """An extractor that reads ``KEY`` from images brighter than mid-grey and its complement from darker ones."""

    def __init__(self) -> None:
        super().__init__(ExtractorConfig(bits=48, filters=8, kernel=3))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        sign = torch.where(images.mean(dim=(1, 2, 3)) > 0, 1.0, -1.0)[:, None]
        return sign * (2 * parse_key(KEY) - 1)[None] * 3


def grey(level: int, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


def test_verdicts_per_image_and_pooled():
    report = verify([("bright", grey(200)), ("dark", grey(40))], KEY, ReadsKey(), fpr=1e-6)
    (_, bright), (_, dark) = report.per_image
    assert (bright.matched, bright.watermarked) == (48, True)
    assert (dark.matched, dark.watermarked) == (0, False)
    assert bright.p_value == pytest.approx(2.0**-48) and bright.threshold == threshold(48, 1e-6) == 41
    assert report.pooled.matched == 48 and report.pooled.bits == 96
    assert report.pooled.p_value == pytest.approx(p_value(48, 96))
    assert report.as_dict()["images"][0]["bit_accuracy"] == 1.0


def test_which_key_and_robustness_table():
    other = "0123456789ab"
    match = identify(grey(200), [other, KEY], ReadsKey(), fpr=1e-6)
    assert match.index == 1 and match.verdict.watermarked and match.keys == 2
    rows = robustness(grey(200, 64), KEY, ReadsKey())
    assert [r["attack"] for r in rows][0] == "none" and len(rows) == 12
    # Every attack keeps this image brighter than mid-grey, so the stub reads the whole key through each.
    assert all(r["matched"] == 48 and r["watermarked"] for r in rows)


def test_refusals(tmp_path):
    with pytest.raises(UserError, match="hex digits"):
        verify([("x", grey(200))], "abc", ReadsKey())
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="unreadable"):
        load_image(tmp_path / "text.png")
    torch.manual_seed(0)
    path = save_extractor(BitExtractor(ExtractorConfig(bits=48, filters=8, kernel=3)), tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="trained against extractor"):
        open_extractor(path, expected_hash="0000000000000000")
    assert extractor_hash(open_extractor(path, expected_hash=None)) == extractor_hash(open_extractor(path))
    with pytest.raises(UserError, match="not a watermark adapter"):
        key_from_adapter(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch.py"), "watermark", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_verify_json_and_one_line_errors(tmp_path):
    torch.manual_seed(0)
    extractor = save_extractor(BitExtractor(ExtractorConfig(bits=48, filters=8, kernel=3)), tmp_path / "x.safetensors")
    grey(120).save(tmp_path / "a.png")
    grey(90).save(tmp_path / "b.png")
    done = run_cli("verify", "--key", KEY, "--extractor", str(extractor), str(tmp_path / "a.png"),
                   str(tmp_path / "b.png"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["images"]) == 2 and report["pooled"]["bits"] == 96
    assert all(0 <= r["matched"] <= 48 for r in report["images"])
    for args, needle in ((("verify", "--key", "zz", "--extractor", str(extractor), str(tmp_path / "a.png")), "hex"),
                         (("verify", "--key", KEY, "--extractor", str(extractor), str(tmp_path / "none.png")),
                          "no such file"),
                         (("identify", "--keys", ",", "--extractor", str(extractor), str(tmp_path / "a.png")),
                          "no keys")):
        bad = run_cli(*args)
        assert bad.returncode != 0 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
