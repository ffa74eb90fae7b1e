"""The micro world's scene generator: determinism, ground truth that matches the pixels, captions, vocab, CLI."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from cli import microworld as cli
from microworld.scenes import (BACKGROUNDS, BASE_FILLS, BASE_SHAPES, COLORS, FILLS, NOVEL_FILLS,
                                         NOVEL_SHAPES, SHAPES, ObjectSpec, SceneConfig, generate_scene,
                                         generate_scenes, parse_caption, render, vocabulary)

ALL = SceneConfig(shapes=SHAPES, fills=FILLS)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["microworld", *argv])
    return args.func(args)


def test_same_seed_same_pixels_and_different_seed_differs():
    a = generate_scene([7, 3], ALL)
    b = generate_scene([7, 3], ALL)
    c = generate_scene([7, 4], ALL)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    # Scene i of a dataset does not depend on the scenes before it.
    assert np.array_equal(list(generate_scenes(1, 7, ALL, start=3))[0].image, a.image)


def test_boxes_and_masks_match_the_pixels():
    background_rgb = {name: np.array(rgb) for name, rgb in BACKGROUNDS.items()}
    for scene in generate_scenes(300, 11, ALL):
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        union = np.zeros((64, 64), dtype=bool)
        for obj, mask in zip(scene.objects, scene.masks):
            assert mask.sum() > 10, "every object stays visible"
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = obj.box
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            assert not (union & mask).any(), "masks of different objects never overlap"
            union |= mask
        # Pixels more than 2 px from every mask (anti-aliased edges, sharp tips) are the flat background colour.
        dilated = union.copy()
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                dilated |= np.roll(union, (dy, dx), axis=(0, 1))
        outside = scene.image[~dilated].astype(int)
        assert np.abs(outside - background_rgb[scene.background]).max() <= 1


def test_mask_pixels_carry_the_object_colour():
    for scene in generate_scenes(100, 12, SceneConfig(fills=("solid",))):
        for obj, mask in zip(scene.objects, scene.masks):
            interior = scene.image[mask].astype(float).mean(axis=0)
            assert np.abs(interior - np.array(COLORS[obj.color])).max() < 25


def test_captions_parse_back_to_labels():
    for scene in generate_scenes(300, 13, ALL):
        objects, background = parse_caption(scene.caption)
        assert background == scene.background
        assert [(o["shape"], o["color"], o["fill"], o["position"]) for o in objects] == \
            [(o.shape, o.color, o.fill, o.position) for o in scene.objects]
    scene = render([ObjectSpec("circle", "red", cx=0.2), ObjectSpec("square", "blue", cx=0.8)], "gray")
    assert scene.caption == "a red circle on the left and a blue square on the right, gray background"
    assert render([ObjectSpec("ring", "orange", "dots")], "black").caption == \
        "a dotted orange ring in the center, black background"


def test_positions_follow_the_grid():
    for scene in generate_scenes(200, 14, SceneConfig()):
        cells = [o.position for o in scene.objects]
        assert len(set(cells)) == len(cells), "objects in one scene sit in different cells"
        for obj in scene.objects:
            if obj.position.endswith("left"):
                assert obj.spec.cx < 1 / 3
            if obj.position.endswith("right"):
                assert obj.spec.cx >= 2 / 3


def test_vocab_split_is_disjoint_and_default_draws_base_only():
    vocab = vocabulary()
    assert not set(vocab["base"]["shapes"]) & set(vocab["novel"]["shapes"])
    assert not set(vocab["base"]["fills"]) & set(vocab["novel"]["fills"])
    assert 6 <= len(vocab["base"]["colors"]) <= 8
    seen = {(o.shape, o.fill) for s in generate_scenes(300, 15) for o in s.objects}
    assert {shape for shape, _ in seen} == set(BASE_SHAPES) and {fill for _, fill in seen} == set(BASE_FILLS)
    assert set(NOVEL_SHAPES) | set(NOVEL_FILLS)


def test_size_parameter_scales_the_scene():
    small = generate_scene(5, SceneConfig(size=32))
    large = generate_scene(5, SceneConfig(size=128))
    assert small.image.shape == (32, 32, 3) and large.image.shape == (128, 128, 3)
    assert small.caption == large.caption


def test_generator_is_fast():
    start = time.perf_counter()
    count = sum(1 for _ in generate_scenes(1000, 16))
    rate = count / (time.perf_counter() - start)
    assert rate > 500, f"{rate:.0f} scenes/s"


def test_dataset_cli_writes_the_studio_layout(tmp_path):
    out = tmp_path / "set"
    assert run("dataset", "--out", str(out), "--n", "12", "--shape", "star", "--fill", "stripes",
               "--objects", "2", "--seed", "3") == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 12
    truth = json.loads((out / "ground_truth.json").read_text())
    for record, image in zip(truth["images"], images):
        assert record["file"] == image.name
        assert (out / image.with_suffix(".txt").name).read_text().strip() == record["caption"]
        assert len(record["objects"]) == 2
        assert all(o["shape"] == "star" and o["fill"] == "stripes" for o in record["objects"])
        assert Image.open(image).size == (64, 64)
    # The studio's dataset reader takes the folder as it is.
    from trainers.dataset import DatasetConfig, ImageFolderDataset
    dataset = ImageFolderDataset(DatasetConfig(folder=str(out)))
    assert len(dataset.samples) == 12 and not dataset.report.skipped
    assert dataset.samples[0].caption == truth["images"][0]["caption"]
    again = tmp_path / "again"
    run("dataset", "--out", str(again), "--n", "12", "--shape", "star", "--fill", "stripes", "--objects", "2",
        "--seed", "3")
    assert (again / images[5].name).read_bytes() == images[5].read_bytes()


@pytest.mark.parametrize("argv", [("--shape", "hexagon"), ("--color", "teal"), ("--fill", "plaid"),
                                  ("--objects", "4"), ("--n", "0")])
def test_dataset_cli_rejects_bad_values(tmp_path, argv):
    args = ["dataset", "--out", str(tmp_path / "x"), "--n", "3", *argv]
    with pytest.raises(UserError):
        run(*args)


def test_vocab_cli(capsys):
    assert run("vocab", "--json") == 0
    assert json.loads(capsys.readouterr().out) == vocabulary()
    assert run("vocab") == 0
    text = capsys.readouterr().out
    assert "novel:" in text and "star" in text
