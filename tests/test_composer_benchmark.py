"""The composer benchmark's cost section sets up every configuration it times (a latent-mode set-up that passed
region pairs where triples were due broke a whole 60-minute run at its very end)."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import MICRO_MODEL, REPO

CONCEPTS = REPO / "assets" / "concepts"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MICRO_MODEL / "model_index.json").is_file()
                                 or not (CONCEPTS / "heart.safetensors").is_file(),
                                 reason="micro model or example concepts not shipped")]


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the benchmark imports its neighbours (process_memory, report)
    spec = importlib.util.spec_from_file_location("composer_microworld", REPO / "bench" / "composer_microworld.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cost_configuration_makes_an_image_of_the_canvas(monkeypatch):
    from models.loading import load_model

    bench = _bench(monkeypatch)
    runner = bench.Runner(load_model(MICRO_MODEL))
    shapes = ["ring", "heart"]
    for method, n in {(m, min(n, 2)) for m, n in bench.cost_configs(shapes)}:
        layout = bench.cost_layout(n, shapes)
        with bench.cost_setup(runner, method, layout) as make:
            image = make(1000)
        assert image.size == (layout["width"], layout["height"]), method
