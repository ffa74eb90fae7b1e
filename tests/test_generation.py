import threading

import numpy as np
import pytest

from core.errors import UserError
from pipelines.generation import GenerationRequest, generate, save_generated
from core.png_metadata import parse_parameters, read_png_parameters
from models.schedulers import SCHEDULER_NAMES


def _arr(item):
    return np.asarray(item.image, dtype=np.int16)


def test_same_seed_same_image_other_seed_other_image(tiny_model):
    a = next(generate(tiny_model, GenerationRequest("a red circle", steps=3, seed=11)))
    b = next(generate(tiny_model, GenerationRequest("a red circle", steps=3, seed=11)))
    c = next(generate(tiny_model, GenerationRequest("a red circle", steps=3, seed=12)))
    assert np.array_equal(_arr(a), _arr(b))
    assert np.abs(_arr(a) - _arr(c)).mean() > 1.0


def test_batch_count_uses_consecutive_seeds_and_reports_every_step(tiny_model):
    seen = []
    items = list(generate(tiny_model, GenerationRequest("x", steps=3, seed=5, batch_count=3),
                          on_step=lambda s, t: seen.append((s, t))))
    assert [i.seed for i in items] == [5, 6, 7]
    assert seen == [(s, 9) for s in range(1, 10)]


def test_cancel_stops_mid_batch(tiny_model):
    cancel = threading.Event()

    def on_step(step, total):
        if step == 4:  # second image, first step
            cancel.set()

    items = list(generate(tiny_model, GenerationRequest("x", steps=3, seed=1, batch_count=5), on_step=on_step,
                          cancel=cancel))
    assert len(items) == 1


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_sampler_runs_and_is_recorded(tiny_model, name):
    item = next(generate(tiny_model, GenerationRequest("x", steps=3, seed=1, scheduler=name)))
    settings = parse_parameters(item.parameters)["settings"]
    assert settings["Sampler"] != "" and np.isfinite(_arr(item)).all()
    if name != "Model default":
        assert settings["Sampler"] == name


@pytest.mark.parametrize("field,value,message", [
    ("steps", 0, "steps"), ("guidance", -1, "guidance"), ("width", 30, "multiple of 8"),
    ("height", 8192, "limit"), ("batch_count", 99, "batch count"), ("scheduler", "bogus", "unknown scheduler"),
])
def test_bad_requests_are_refused_with_a_message(tiny_model, field, value, message):
    fields = {"steps": 2, "width": 4096} if field == "height" else {"steps": 2}
    req = GenerationRequest("x", **{**fields, field: value})
    with pytest.raises(UserError, match=message):
        next(generate(tiny_model, req))


def test_size_and_native_default(tiny_model):
    item = next(generate(tiny_model, GenerationRequest("x", steps=2, seed=0)))
    assert item.image.size == (tiny_model.native_size, tiny_model.native_size)
    item = next(generate(tiny_model, GenerationRequest("x", steps=2, seed=0, width=48, height=24)))
    assert item.image.size == (48, 24)


def test_long_prompt_is_flagged(tiny_model):
    item = next(generate(tiny_model, GenerationRequest("red circle " * 60, steps=2, seed=0)))
    assert any("tokens" in w for w in item.record["warnings"])


def test_saved_files_carry_parameters(tiny_model, tmp_path):
    item = next(generate(tiny_model, GenerationRequest("a blue square", negative_prompt="blur", steps=2, seed=3)))
    first = save_generated(item, tmp_path)
    second = save_generated(item, tmp_path)
    assert first.name == "00000-3.png" and second.name == "00001-3.png"
    parsed = parse_parameters(read_png_parameters(first))
    assert parsed["prompt"] == "a blue square" and parsed["negative_prompt"] == "blur"
    assert parsed["settings"]["Seed"] == "3" and parsed["settings"]["Model hash"] == tiny_model.fingerprint[:10]


def test_samplers_that_need_a_finite_sigma_are_refused_on_zero_snr_schedules():
    from diffusers import DDIMScheduler

    from models.schedulers import NEEDS_FINITE_SIGMA, SCHEDULERS, make_scheduler

    zero_snr = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                             timestep_spacing="trailing")
    sd = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name in SCHEDULERS:
        assert make_scheduler(name, sd) is not None
        if name in NEEDS_FINITE_SIGMA:
            with pytest.raises(UserError, match="zero-terminal-SNR"):
                make_scheduler(name, zero_snr)
        else:
            scheduler = make_scheduler(name, zero_snr)
            scheduler.set_timesteps(20)
            assert len(scheduler.timesteps) >= 20 and scheduler.config.prediction_type == "v_prediction"


def test_the_pages_offer_only_the_samplers_the_models_schedule_works_with():
    """Not offered, rather than refused after a click: on a zero-terminal-SNR schedule (the micro model) every listed
    sampler makes a scheduler; on SD's schedule all are listed."""
    from diffusers import DDIMScheduler

    from models.schedulers import NEEDS_FINITE_SIGMA, SCHEDULER_NAMES, make_scheduler, usable_scheduler_names

    zero_snr = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                             timestep_spacing="trailing")
    sd = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert usable_scheduler_names(sd) == SCHEDULER_NAMES
    offered = usable_scheduler_names(zero_snr)
    assert offered[0] == "Model default" and not set(NEEDS_FINITE_SIGMA) & set(offered)
    for name in offered:
        assert make_scheduler(name, zero_snr) is not None  # none of them is refused
