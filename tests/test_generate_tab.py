"""The Generate tab's helpers for its per-image actions, session history and refusals, without a page."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.generate_tab import (SENT_SETTINGS, Shot, image_to, refused_on_page, settings_to_compose, upscaled_shots,
                              with_history)

PARAMETERS = ("<lora:ring:0.8> a blue ring, gray background\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, "
              "CFG scale: 6.5, Seed: 124, Size: 64x48, Model hash: abc, Model: micro-sd, Version: atelier")


def shot(n: int) -> Shot:
    return Shot(f"/out/{n:05d}-{n}.png", n, f"p {n}", f"seed {n}")


def test_history_is_newest_first_and_capped():
    history = with_history([shot(0), shot(1)], [])
    assert [s.seed for s in history] == [1, 0]
    history = with_history([shot(2)], history)
    assert [s.seed for s in history] == [2, 1, 0]
    assert [s.seed for s in with_history([shot(3), shot(4)], history, keep=3)] == [4, 3, 2]


def test_upscaled_images_keep_their_source_seed_and_parameters():
    done = [(Path("/out/00001-1.png"), Path("/out/upscaled/00001-1_x4.png"))]
    [up] = upscaled_shots(done, [shot(0), shot(1)])
    assert (up.path, up.seed, up.parameters, up.caption) == ("/out/upscaled/00001-1_x4.png", 1, "p 1",
                                                            "00001-1_x4.png")


def test_send_to_compose_gives_the_prompt_without_lora_tags_and_the_settings(capsys):
    values = settings_to_compose(Shot("/out/x.png", 124, PARAMETERS, "seed 124"))
    sent = dict(zip(SENT_SETTINGS, values))
    assert sent == {"prompt": "a blue ring, gray background", "negative_prompt": "blurry", "steps": 4,
                    "guidance": 6.5, "seed": 124, "width": 64, "height": 48, "sampler": "Euler a"}
    assert isinstance(values[-1], gr.Tabs) and values[-1].selected == "compose"
    assert "tags were left out" in capsys.readouterr().out  # gr.Info outside a page prints


def test_send_to_compose_leaves_a_foreign_sampler_alone():
    values = settings_to_compose(Shot("/out/x.png", 1, PARAMETERS.replace("Euler a", "LCM Turbo"), "seed 1"))
    assert isinstance(dict(zip(SENT_SETTINGS, values))["sampler"], type(gr.skip()))


def test_send_an_image_to_another_tab():
    files, tab = image_to("verify")(shot(7))
    assert files == ["/out/00007-7.png"] and tab.selected == "verify"
    with pytest.warns(UserWarning, match="Select an image"):
        assert image_to("verify")(None) == (gr.skip(), gr.skip())


def test_a_refusal_on_the_page_is_one_log_line_a_warning_and_a_status(capsys):
    with pytest.warns(UserWarning, match="&lt;lora:nosuch&gt;"):
        status = refused_on_page("<lora:nosuch>: no adapter of that name in the Library")
    assert status == "⚠ &lt;lora:nosuch&gt;: no adapter of that name in the Library"
    assert capsys.readouterr().err.splitlines() == ["refused: <lora:nosuch>: no adapter of that name in the Library"]
