"""SaRA: trainable set, the memory-saving backward, the nuclear norm, progressive freeze, the delta file."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, one_and_two_processes, run_cli
from core.errors import UserError
from trainers.sara import (SaraMethod, SaraOptions, masks_for, nuclear_norm, parse_budget, plan_selection,
                           progressive_freeze, threshold_for_count)
from adapters.sara.layer import wrap_layers


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 80)
        self.out = nn.Linear(80, 72)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.out(torch.tanh(self.proj(h)))


# ------------------------------------------------------------------------------------------- trainable set


def test_budget_parsing():
    assert parse_budget("5%", 1000) == 50
    assert parse_budget("50M", 10**9) == 50_000_000
    assert parse_budget("1.5k", 10**6) == 1500
    assert parse_budget("120", 100) == 100  # capped at the total
    for bad in ("lots", "0%", "150%", "-3", "5%%"):
        with pytest.raises(UserError):
            parse_budget(bad, 1000)


def test_threshold_from_budget_is_the_global_quantile():
    model = Tiny()
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    everything = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    for count in (1, 37, 500, everything.numel() // 3):
        theta = threshold_for_count(weights, count)
        assert int((everything < theta).sum()) == count
        assert theta == pytest.approx(float(torch.sort(everything).values[count]))
    plan = plan_selection(model, SaraOptions(budget="10%"))
    assert plan.count == round(0.10 * plan.total) and plan.budget == "10%"
    assert plan.lr == pytest.approx(1e-3 * math.exp(-350 * plan.threshold))


def test_mask_from_threshold():
    model = Tiny()
    masks = masks_for(model, 0.05)
    for name, index in masks.items():
        weight = model.get_submodule(name).weight.detach().reshape(-1)
        expected = torch.nonzero(weight.abs() < 0.05).reshape(-1)
        assert torch.equal(index, expected)
    plan = plan_selection(model, SaraOptions(threshold=0.05))
    assert plan.count == sum(i.numel() for i in masks.values()) and plan.threshold == 0.05
    with pytest.raises(UserError):
        plan_selection(model, SaraOptions(threshold=1e-12))  # selects nothing
    with pytest.raises(UserError):
        SaraOptions(budget="5%", threshold=0.1).validate()


# ------------------------------------------------------------------------------------------- backward


def _wrapped(sparse_backward: bool = True, threshold: float = 0.05):
    model = Tiny()
    model.requires_grad_(False)
    layers = wrap_layers(model, masks_for(model, threshold), sparse_backward=sparse_backward)
    return model, layers


def test_gradients_reach_only_masked_entries_and_match_dense_autograd():
    x = torch.randn(4, 3, 6, 6)
    model, layers = _wrapped()
    reference = Tiny()  # same seed, same weights, ordinary autograd
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    for name, layer in layers.items():
        dense = reference.get_submodule(name).weight.grad.reshape(-1)
        torch.testing.assert_close(layer.delta.grad, dense[layer.index.long()], rtol=1e-4, atol=1e-6)
        assert layer.weight.grad is None and not layer.weight.requires_grad
        assert layer.delta.numel() == layer.index.numel() < layer.weight.numel()


def test_no_full_size_grad_after_an_optimizer_step_and_weights_follow_delta():
    model, layers = _wrapped()
    params = [layer.delta for layer in layers.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 6, 6))  # the forward writes P₀ + δ into the weight
    full_size = [n for n, p in model.named_parameters() if p.grad is not None]
    assert full_size == []
    for state in optimizer.state.values():
        assert all(v.numel() in (1, *(p.numel() for p in params)) for v in state.values() if torch.is_tensor(v))
    for name, layer in layers.items():
        changed = torch.nonzero((layer.weight.detach() != before[name]).reshape(-1)).reshape(-1)
        assert set(changed.tolist()) <= set(layer.index.tolist()) and changed.numel() > 0
        torch.testing.assert_close(layer.weight.detach().reshape(-1)[layer.index.long()],
                                   layer.base_values + layer.delta.detach())


def test_sparse_and_dense_backward_agree_under_autocast_and_checkpointing():
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(3, 3, 6, 6)
    grads = []
    for sparse in (True, False):
        model, layers = _wrapped(sparse_backward=sparse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = checkpoint(model, x, use_reentrant=False)
        out.float().square().mean().backward()
        grads.append(torch.cat([layer.delta.grad for layer in layers.values()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0.05, atol=1e-3)


def test_nuclear_norm_gradient_reaches_the_trainable_values():
    model, layers = _wrapped(threshold=0.2)
    layer = layers["out"]
    norm = nuclear_norm(layer)
    S = torch.zeros(layer.weight.numel())
    S[layer.index.long()] = layer.base_values
    assert norm.item() == pytest.approx(float(torch.linalg.svdvals(S.view(72, 80)).sum()), rel=1e-4)
    norm.backward()
    assert layer.delta.grad is not None and layer.delta.grad.abs().sum() > 0


def test_progressive_freeze_keeps_the_moments_of_survivors():
    model, layers = _wrapped()
    params = [layer.delta for layer in layers.values()]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = layers["proj"]
    old = layer.delta
    threshold = 0.05
    keep = (layer.current_values().abs() < threshold).detach()
    assert 0 < int(keep.sum()) < keep.numel(), "the test needs some entries to grow past θ"
    moments = {k: v.clone() for k, v in optimizer.state[old].items()}
    grown_values = layer.current_values().detach()[~keep]
    grown_positions = layer.index[~keep].long()
    frozen, new_params = progressive_freeze(layers, threshold, optimizer)
    assert frozen >= int((~keep).sum())
    new = layer.delta
    assert new is not old and any(p is new for p in new_params) and not any(p is old for p in new_params)
    torch.testing.assert_close(optimizer.state[new]["exp_avg"], moments["exp_avg"][keep])
    torch.testing.assert_close(optimizer.state[new]["exp_avg_sq"], moments["exp_avg_sq"][keep])
    assert optimizer.state[new]["step"] == moments["step"]
    # frozen entries keep their value in the weight and in the saved delta; training goes on for the rest
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    optimizer.step()
    model(torch.randn(1, 3, 6, 6))
    torch.testing.assert_close(layer.weight.detach().reshape(-1)[grown_positions], grown_values)
    index, delta = layer.all_entries()
    assert index.numel() == keep.numel()


# ------------------------------------------------------------------------------------------- through the loop


def _config(data, model, tmp, **kw):
    from trainers.loop import TrainConfig

    base = dict(data=str(data), out=str(tmp / "delta.safetensors"), model=str(model), steps=6, batch_size=2,
                lr=5e-3, checkpoint_every=2, seed=3, trigger="sks",
                method_options={"budget": "10%", "lambda_rank": 5e-3, "progressive": 0.5, "min_rank_side": 4})
    return TrainConfig(**{**base, **kw})


class StopAfter(SaraMethod):
    def __init__(self, run_dir: Path, at: int) -> None:
        super().__init__()
        self.run_dir, self.at, self.steps_seen = run_dir, at, 0

    def after_step(self, step, optimizer):
        if step == self.at:
            (self.run_dir / "STOP").write_text("stop")
        return super().after_step(step, optimizer)


def test_resume_across_the_progressive_freeze_is_exact(data, tiny_model_dir, tmp_path):
    from trainers.events import read_events
    from trainers.loop import train

    straight = SaraMethod()
    train(_config(data, tiny_model_dir, tmp_path), straight, tmp_path / "a")
    stopped = train(_config(data, tiny_model_dir, tmp_path), StopAfter(tmp_path / "b", 4), tmp_path / "b")
    assert stopped.status == "stopped" and stopped.step == 4
    resumed = SaraMethod()
    result = train(_config(data, tiny_model_dir, tmp_path), resumed, tmp_path / "b", resume=True)
    assert result.status == "done"
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    frozen = [e for e in read_events(tmp_path / "a") if e["event"] == "parameters_changed"]
    assert len(frozen) == 1 and frozen[0]["step"] == 3 and frozen[0]["frozen"] > 0
    method = next(e for e in read_events(tmp_path / "a") if e["event"] == "method")
    assert method["trainable"] > 0 and method["threshold"] > 0


def test_runs_with_bf16_autocast_checkpointing_and_accumulation(data, tiny_model_dir, tmp_path):
    from trainers.events import read_events
    from trainers.loop import train

    method = SaraMethod()
    result = train(_config(data, tiny_model_dir, tmp_path, steps=2, grad_accum=2, mixed_precision="bf16",
                           gradient_checkpointing=True), method, tmp_path / "run")
    start = next(e for e in read_events(tmp_path / "run") if e["event"] == "start")
    assert result.status == "done" and start["mixed_precision"] == "bf16"
    assert all(l == l for l in result.losses)
    assert any(layer.delta.detach().abs().sum() > 0 for layer in method.layers.values())


def test_delta_file_round_trip_strength_merge_and_base_check(data, tiny_model_dir, tmp_path):
    from models.loading import load_model
    from adapters.sara.files import (check_same_base, load_sparse_delta, merge_sparse_deltas,
                                        sparse_deltas_applied)
    from trainers.loop import train

    method = SaraMethod()
    result = train(_config(data, tiny_model_dir, tmp_path, steps=3), method, tmp_path / "run")
    delta = load_sparse_delta(Path(result.artifact))
    assert delta.count == method.plan.count and delta.metadata["atelier.trigger_words"] == "sks"
    assert float(delta.metadata["atelier.sara_threshold"]) == pytest.approx(method.plan.threshold)

    model = load_model(tiny_model_dir)
    unet = model.pipe.unet
    name, t = next((n, t) for n, t in delta.tensors.items() if t.values.abs().sum() > 0)
    weight = unet.get_parameter(name.removeprefix("unet."))
    before = weight.detach().clone()
    with sparse_deltas_applied(model.pipe, [(delta, 0.5), (delta, 0.25)], fingerprint=model.fingerprint):
        changed = weight.detach().reshape(-1)[t.index] - before.reshape(-1)[t.index]
        torch.testing.assert_close(changed, 0.75 * t.values, rtol=1e-3, atol=1e-6)
    assert torch.equal(weight.detach(), before)  # bit-exact afterwards

    merge_sparse_deltas(model.pipe, [(delta, 1.0)])
    torch.testing.assert_close(weight.detach().reshape(-1)[t.index] - before.reshape(-1)[t.index], t.values,
                               rtol=1e-3, atol=1e-6)
    with pytest.raises(UserError, match="another base model.*" + model.fingerprint):
        check_same_base(delta.__class__(delta.tensors, {**delta.metadata, "atelier.base_fingerprint": "0" * 16}),
                        model.fingerprint)


def test_cli_train_info_merge_extract_and_refusals(data, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from adapters.lora.files import delta as lora_delta, load_lora
    from adapters.sara.files import load_sparse_delta

    out = tmp_path / "d.safetensors"
    trained = run_cli("train", "sara", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out),
                      "--steps", "3", "--budget", "5%", "--batch-size", "2", "--run-dir", str(tmp_path / "run"),
                      "--lr", "1e-2")
    assert trained.returncode == 0, trained.stderr
    assert "θ =" in trained.stdout and "learning rate" in trained.stdout
    info = run_cli("sara", "info", str(out), "--json")
    assert info.returncode == 0 and '"budget": "5%"' in info.stdout

    lora_out = tmp_path / "extracted.safetensors"
    extracted = run_cli("sara", "extract", str(out), "--rank", "64", "--format", "kohya", "--out", str(lora_out))
    assert extracted.returncode == 0, extracted.stderr
    lora = load_lora(lora_out)
    delta = load_sparse_delta(out)
    name, t = max(delta.tensors.items(), key=lambda kv: kv[1].values.abs().sum().item())
    rebuilt = lora_delta(lora.layers[name.removesuffix(".weight")]).reshape(t.shape)
    torch.testing.assert_close(rebuilt, t.dense(), rtol=1e-3, atol=1e-4)  # rank 64 ≥ the tiny layers' rank

    merged = run_cli("sara", "merge", f"{out}:1.0", "--model", str(tiny_model_dir), "--out", str(tmp_path / "m"))
    assert merged.returncode == 0, merged.stderr
    weights = load_file(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    key = name.removeprefix("unet.")
    torch.testing.assert_close(weights[key].reshape(-1)[t.index] - base[key].float().reshape(-1)[t.index],
                               t.values, rtol=1e-3, atol=1e-5)

    other = run_cli("generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--steps", "1",
                    "--lora", str(out), "--model", str(REPO / "assets" / "micro-sd"))
    if (REPO / "assets" / "micro-sd").is_dir():
        assert other.returncode == 2 and "another base model" in other.stderr
    bad = run_cli("train", "sara", "--data", str(data), "--model", str(tiny_model_dir), "--out",
                  str(tmp_path / "e.safetensors"), "--budget", "lots")
    assert bad.returncode == 2 and "budget" in bad.stderr and "Traceback" not in bad.stderr
    not_sara = run_cli("sara", "info", str(lora_out))
    assert not_sara.returncode == 2 and "not a SaRA" in not_sara.stderr


def test_two_processes_give_the_delta_of_one(data, tiny_model_dir, tmp_path):
    from adapters.sara.files import load_sparse_delta
    from trainers.events import read_events

    common = ["train", "sara", "--data", str(data), "--model", str(tiny_model_dir), "--steps", "4",
              "--batch-size", "2", "--seed", "1", "--lr", "1e-2", "--budget", "5%", "--progressive", "0.5"]
    one_and_two_processes(common, tmp_path)
    # Same positions, same values within float tolerance. (Which entries freeze may differ for the odd entry at
    # |w| ≈ θ: one process and two sum the gradients in another order. Within one two-process run all ranks agree,
    # since they share the all-reduced gradients.)
    one_delta, two_delta = (load_sparse_delta(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert one_delta.tensors.keys() == two_delta.tensors.keys()
    differing = 0
    for name, t in one_delta.tensors.items():
        assert torch.equal(t.index, two_delta.tensors[name].index), name
        differing += int(((t.values - two_delta.tensors[name].values).abs() > 1e-3).sum())
    assert differing <= 1e-3 * one_delta.count, f"{differing} of {one_delta.count} entries differ"
    starts = [next(e for e in read_events(tmp_path / r) if e["event"] == "start") for r in ("r1", "r2")]
    assert [s["processes"] for s in starts] == [1, 2]


def test_generation_applies_a_delta_with_its_strength_and_restores_the_base(data, tiny_model_dir, tmp_path):
    import numpy as np

    from pipelines.generation import GenerationRequest, generate
    from models.loading import load_model
    from trainers.loop import train

    result = train(_config(data, tiny_model_dir, tmp_path, steps=3, lr=5e-2), SaraMethod(), tmp_path / "run")
    model = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}

    def image(strength: float | None):
        loras = () if strength is None else ((result.artifact, strength),)
        request = GenerationRequest(prompt="sks a red circle", steps=2, seed=5, loras=loras)
        return np.asarray(next(generate(model, request)).image, dtype=np.int16)

    plain, zero, full = image(None), image(0.0), image(1.0)
    assert np.array_equal(plain, zero)  # strength 0 is the base model
    assert np.abs(full - plain).max() > 0  # the delta changes the picture
    after = model.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # and is taken off bit-exactly
