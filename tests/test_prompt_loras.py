"""A1111's <lora:NAME:WEIGHT> prompt tags: resolved to Library files, cut from what the encoder reads, applied as if
chosen in the adapter slots."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from core.errors import UserError
from pipelines.generation import GenerationRequest, generate
from pipelines.prompt_loras import lora_tags, strip_lora_tags

from bad_inputs import good_tiny_lora


def test_tags_are_cut_from_the_encoded_prompt():
    assert strip_lora_tags("<lora:star:0.8> sks a red star, <LORA:ink>, gray background") == \
        "sks a red star, gray background"
    assert strip_lora_tags("a red circle") == "a red circle"


def test_tags_resolve_to_library_files_by_name(tmp_path):
    (tmp_path / "Star.safetensors").write_bytes(b"x")
    assert lora_tags("<lora:Star:0.5> a star", tmp_path) == ((str(tmp_path / "Star.safetensors"), 0.5),)
    assert lora_tags("<lora:star> a star", tmp_path) == ((str(tmp_path / "Star.safetensors"), 1.0),)  # any case
    with pytest.raises(UserError, match=r"<lora:stra>: no adapter of that name.*did you mean Star"):
        lora_tags("<lora:stra:1> a star", tmp_path)
    assert lora_tags("no tags here", None) == ()


def test_a_tag_applies_the_adapter_like_a_slot(tiny_model, tmp_path, bad_corpus):
    shutil.copy(good_tiny_lora(bad_corpus), tmp_path / "mine.safetensors")
    base = dict(steps=2, seed=5, width=32, height=32, lora_folder=str(tmp_path))

    def pixels(request):
        return np.asarray(next(generate(tiny_model, request)).image)

    slot = pixels(GenerationRequest(prompt="a red circle", loras=((str(tmp_path / "mine.safetensors"), 2.0),), **base))
    tag = next(generate(tiny_model, GenerationRequest(prompt="<lora:mine:2> a red circle", **base)))
    plain = pixels(GenerationRequest(prompt="a red circle", **base))
    assert np.array_equal(np.asarray(tag.image), slot) and not np.array_equal(slot, plain)
    assert tag.parameters.startswith("<lora:mine:2> a red circle") and 'Lora: "mine:2"' in tag.parameters
    with pytest.raises(UserError, match="no adapter of that name"):
        next(generate(tiny_model, GenerationRequest(prompt="<lora:nothing:1> a red circle", **base)))


def test_an_empty_prompt_is_warned_about(tiny_model):
    base = dict(steps=1, seed=5, width=32, height=32)
    empty = next(generate(tiny_model, GenerationRequest(prompt="  ", **base)))
    assert any("the prompt is empty" in w for w in empty.record["warnings"])
    typed = next(generate(tiny_model, GenerationRequest(prompt="a red circle", **base)))
    assert not any("empty" in w for w in typed.record["warnings"])
