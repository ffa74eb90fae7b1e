"""The shared loop: exact resume, graceful stop, atomic checkpoints, loss weighting, and that training works."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import UserError
from trainers.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from trainers.events import read_events
from trainers.loop import STOP_FILE, TrainConfig, snr_weights, train
from trainers.lora import LoraMethod
from training_data import draw_dataset, fixed_noise_loss


class StateOnly(LoraMethod):
    """LoRA whose artefact is skipped: these tests look at the loop, not at adapter files."""

    def save_artifact(self, path, model, config):
        Path(path).write_bytes(b"")


class StopAt(StateOnly):
    """Asks the loop to stop (as the Stop button does, with the STOP file) once ``at`` steps have run."""

    def __init__(self, run_dir: Path, at: int) -> None:
        super().__init__()
        self.run_dir, self.at, self.calls = run_dir, at, 0

    def extra_loss(self):
        self.calls += 1
        if self.calls == self.at:
            (self.run_dir / STOP_FILE).write_text("stop")
        return None


def _config(data: Path, model: Path, tmp: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(tmp / "out.safetensors"), model=str(model), steps=6, batch_size=2, lr=1e-3,
                checkpoint_every=2, seed=3, noise_offset=0.05, min_snr_gamma=5.0, method_options={"rank": 4})
    return TrainConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.mark.parametrize("with_prior", [False, True])
def test_resume_is_exact(data, tiny_model_dir, tmp_path, with_prior):
    extra = {}
    if with_prior:  # prior-preservation images add their own loss; a resume must still be exact
        extra = {"prior_data": str(draw_dataset(tmp_path / "prior", n=3, caption="a red square", shape="square"))}
    straight = StateOnly()
    result = train(_config(data, tiny_model_dir, tmp_path, steps=6, **extra), straight, tmp_path / "a")
    assert result.status == "done" and result.step == 6

    first = StopAt(tmp_path / "b", at=3)
    stopped = train(_config(data, tiny_model_dir, tmp_path, steps=6, **extra), first, tmp_path / "b")
    assert stopped.status == "stopped" and stopped.step == 3
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000003"
    resumed = StateOnly()
    result = train(_config(data, tiny_model_dir, tmp_path, steps=6, **extra), resumed, tmp_path / "b", resume=True)
    assert result.status == "done" and result.step == 6
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert straight.trainable_state() != {} and any(v.abs().sum() > 0 for v in a.values())
    kinds = [e["event"] for e in read_events(tmp_path / "b")]
    assert kinds.count("stopped") == 1 and "resumed" in kinds and kinds[-1] == "done"
    if with_prior:
        plain = StateOnly()
        train(_config(data, tiny_model_dir, tmp_path, steps=6), plain, tmp_path / "c")
        assert any(not torch.allclose(plain.trainable_state()[k], a[k]) for k in a), "the prior loss had no effect"
        logged = [e["message"] for e in read_events(tmp_path / "a") if e["event"] == "dataset"]
        assert "prior: 3 image(s) used" in logged, logged


def test_checkpoints_are_complete_and_pruned(data, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(_config(data, tiny_model_dir, tmp_path, steps=8, checkpoint_every=2), StateOnly(), run)
    (run / "checkpoints" / ".tmp-step-0000010-crashed").mkdir()  # what a crash mid-write leaves behind
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step-0000006", "step-0000008"]
    state, trainable, optimizer = load_checkpoint(run / "checkpoints" / "step-0000008")
    assert state.step == 8 and trainable and optimizer["state"]
    assert all(not p.name.endswith(".pkl") for p in (run / "checkpoints").rglob("*"))


def test_training_lowers_the_denoising_loss(data, tiny_model_dir, tmp_path):
    """On fixed noise and timesteps, the trained LoRA denoises its dataset better than the base model."""
    from models.loading import load_model

    method = StateOnly()
    cfg = _config(data, tiny_model_dir, tmp_path, steps=40, lr=3e-3, min_snr_gamma=0.0, noise_offset=0.0,
                  checkpoint_every=100, method_options={"rank": 8})
    pipe = load_model(tiny_model_dir).pipe

    def eval_loss(unet) -> float:
        return fixed_noise_loss(pipe, data, "a red circle", unet)

    before = eval_loss(pipe.unet)
    result = train(cfg, method, tmp_path / "run")
    after = eval_loss(method.unet)
    assert result.status == "done"
    print(f"denoising loss before {before:.4f} after {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_validation_loss_on_held_out_images_is_deterministic_and_falls(data, tiny_model_dir, tmp_path):
    """A share of the training images held out: the validation loss (fixed noise and timesteps) is logged at the
    start, at every checkpoint and at the end; the same run gives the same numbers, and training lowers it."""
    cfg = _config(data, tiny_model_dir, tmp_path, steps=30, lr=3e-3, min_snr_gamma=0.0, noise_offset=0.0,
                  checkpoint_every=10, validation_split=0.5, method_options={"rank": 8})

    def validation(run: Path) -> list[tuple[int, float]]:
        return [(e["step"], e["loss"]) for e in read_events(run) if e["event"] == "validation"]

    train(cfg, StateOnly(), tmp_path / "a")
    train(cfg, StateOnly(), tmp_path / "b")
    a = validation(tmp_path / "a")
    assert [step for step, _ in a] == [0, 10, 20, 30] and a == validation(tmp_path / "b")
    assert a[-1][1] < a[0][1], a
    used = [e["message"] for e in read_events(tmp_path / "a") if e["event"] == "dataset"]
    held = next(e for e in read_events(tmp_path / "a") if e["event"] == "validation")
    assert held["images"] == 2 and held["timesteps"] == [125, 375, 625, 875], held
    assert "validation: 2 image(s) held out of training: img01.png, img03.png" in used, used  # every 2nd, by name


def test_a_validation_folder_or_share_not_both(data, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not both"):
        _config(data, tiny_model_dir, tmp_path, validation_data=str(data), validation_split=0.2).validate()
    with pytest.raises(UserError, match="share"):
        _config(data, tiny_model_dir, tmp_path, validation_split=1.5).validate()


def test_min_snr_weights():
    ac = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    w = snr_weights(ac, t, gamma=5.0, prediction_type="epsilon")
    snr = ac / (1 - ac)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and w[2] == 1
    v = snr_weights(ac, t, gamma=5.0, prediction_type="v_prediction")
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_min_snr_weights_agree_with_diffusers_compute_snr(zero_terminal_snr):
    """Our weights equal diffusers' (compute_snr and the min-SNR weighting of its training examples) wherever both
    are defined; at a zero-terminal-SNR timestep diffusers' ε weight is 0/0 = NaN and ours is the limit 1. The SNR
    itself is computed as ᾱ/(1−ᾱ), not through compute_snr's (√ᾱ/√(1−ᾱ))², which differs by float rounding (~3e-7
    relative): keeping our one division keeps earlier runs' weights bit-identical."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, rescale_betas_zero_snr=zero_terminal_snr,
                                  prediction_type=prediction_type)
        t = torch.arange(1000)
        ours = snr_weights(scheduler.alphas_cumprod, t, 5.0, prediction_type)
        snr = compute_snr(scheduler, t)
        clipped = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        theirs = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
        defined = torch.isfinite(theirs)
        assert defined[:-1].all() and bool(defined[-1]) == (not zero_terminal_snr or prediction_type != "epsilon")
        torch.testing.assert_close(ours[defined], theirs[defined], rtol=1e-5, atol=0)
        assert torch.isfinite(ours).all()
        if zero_terminal_snr and prediction_type == "epsilon":
            assert ours[-1] == 1


def test_accumulation_bf16_and_checkpointing_run(data, tiny_model_dir, tmp_path):
    cfg = _config(data, tiny_model_dir, tmp_path, steps=2, grad_accum=2, mixed_precision="bf16",
                  gradient_checkpointing=True, lr_scheduler="cosine", warmup_steps=1)
    result = train(cfg, StateOnly(), tmp_path / "run")
    events = [e for e in read_events(tmp_path / "run") if e["event"] in ("start", "step")]
    assert result.status == "done" and events[0]["mixed_precision"] == "bf16"
    assert [e["step"] for e in events[1:]] == [1, 2] and all(e["loss"] == e["loss"] for e in events[1:])


def test_bad_config_is_refused(data, tiny_model_dir, tmp_path):
    from core.errors import UserError

    with pytest.raises(UserError, match="lr scheduler"):
        train(_config(data, tiny_model_dir, tmp_path, lr_scheduler="bogus"), StateOnly(), tmp_path / "r")
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(_config(data, tiny_model_dir, tmp_path), StateOnly(), tmp_path / "empty", resume=True)
