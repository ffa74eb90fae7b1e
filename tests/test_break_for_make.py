"""Break-for-Make: the PLP layer's contract, the stage-1 gradient routing, combining, export, the preconditioner."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import UserError
from trainers.break_for_make import B4MMethod, read_plp_file
from adapters.plp.layer import PLPLinear, attach_plp, frozen_parts, gradient_route, precondition_gradients


def _layer(seed: int = 0, rank: int = 3, out_features: int = 10, in_features: int = 12) -> PLPLinear:
    torch.manual_seed(1)
    return PLPLinear(nn.Linear(in_features, out_features), "blocks.0.to_q", rank, alpha=rank, seed=seed)


def _randomise(layer: PLPLinear, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.up_trainable.copy_(torch.randn(layer.up_trainable.shape, generator=g))
        layer.down_trainable.copy_(torch.randn(layer.down_trainable.shape, generator=g))


def test_delta_is_zero_at_start_and_the_forward_is_the_base():
    layer = _layer()
    x = torch.randn(4, 7, 12)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_delta_leaves_out_the_frozen_block_and_the_forward_matches_it():
    layer = _layer(rank=3)
    _randomise(layer)
    a, b, c, e = layer.up_frozen, layer.up_trainable.detach(), layer.down_frozen, layer.down_trainable.detach()
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[:5, :6]) == 0  # the frozen×frozen block A·C
    torch.testing.assert_close(delta[:5, 6:], a @ e)
    torch.testing.assert_close(delta[5:, :6], b @ c)
    torch.testing.assert_close(delta[5:, 6:], b @ e)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


def test_conv_layers_split_input_channels_and_match_their_delta():
    import torch.nn.functional as F

    from adapters.plp.layer import plp_halves

    torch.manual_seed(2)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    layer = PLPLinear(conv, "res.conv1", rank=2, alpha=2, seed=4)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)
    _randomise(layer)
    delta = layer.delta_weight()
    assert delta.shape == conv.weight.shape
    assert torch.count_nonzero(delta[:4, :3]) == 0  # frozen rows × frozen input channels
    expected = conv(x) + F.conv2d(x, delta, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    down, up = layer.export_pair()
    halves = plp_halves(down, up)
    assert torch.equal(halves.e, layer.down_trainable.detach()) and torch.equal(halves.b, layer.up_trainable.detach())
    assert torch.equal(halves.c, layer.down_frozen) and torch.equal(halves.a, layer.up_frozen)


def test_frozen_halves_are_orthonormal_reproducible_and_seed_dependent():
    a, c = frozen_parts("x.to_k", 64, 32, 4, seed=7)
    a2, c2 = frozen_parts("x.to_k", 64, 32, 4, seed=7)
    assert torch.equal(a, a2) and torch.equal(c, c2)
    torch.testing.assert_close(a.T @ a, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(c @ c.T, torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.equal(frozen_parts("x.to_k", 64, 32, 4, seed=8)[0], a)
    assert not torch.equal(frozen_parts("y.to_k", 64, 32, 4, seed=7)[0], a)
    with pytest.raises(ValueError, match="rank"):
        frozen_parts("x.to_k", 6, 32, 4, seed=7)


def test_frozen_halves_stay_out_of_the_optimizer_and_do_not_move():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    layers = attach_plp(net, rank=2, alpha=2, seed=3, targets=("0", "2"))
    frozen = {n: (l.up_frozen.clone(), l.down_frozen.clone()) for n, l in layers.items()}
    base = [p.detach().clone() for p in net.parameters() if not p.requires_grad]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for l in layers.values() for p in (l.up_trainable, l.down_trainable)}
    opt = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.5)
    for _ in range(5):
        net(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for name, layer in layers.items():
        assert torch.equal(layer.up_frozen, frozen[name][0]) and torch.equal(layer.down_frozen, frozen[name][1])
        assert layer.up_trainable.abs().sum() > 0 and layer.down_trainable.abs().sum() > 0
    assert all(torch.equal(p, q) for p, q in zip(base, [p for p in net.parameters() if not p.requires_grad]))


def test_both_halves_get_gradient_from_the_first_step_and_routing_chooses_one():
    layer = _layer()
    x = torch.randn(5, 12)
    layer(x).pow(2).sum().backward()
    assert layer.up_trainable.grad.abs().sum() > 0 and layer.down_trainable.grad.abs().sum() > 0
    for up, down in ((True, False), (False, True)):
        layer.zero_grad()
        with gradient_route({"l": layer}, up=up, down=down):
            layer(x).pow(2).sum().backward()
        assert (layer.up_trainable.grad is not None) == up and (layer.down_trainable.grad is not None) == down
    assert layer.grad_to_up and layer.grad_to_down  # restored after the block


def test_preconditioner_changes_the_gradient_as_defined():
    layer = _layer(rank=3)
    _randomise(layer)
    layer(torch.randn(6, 12)).pow(2).sum().backward()
    gb, ge = layer.up_trainable.grad.clone(), layer.down_trainable.grad.clone()
    precondition_gradients({"l": layer}, eps=1e-6)
    d = torch.cat([layer.down_frozen, layer.down_trainable.detach()], dim=1)
    u = torch.cat([layer.up_frozen, layer.up_trainable.detach()], dim=0)
    eye = torch.eye(3)
    torch.testing.assert_close(layer.up_trainable.grad, gb @ torch.linalg.inv(d @ d.T + 1e-6 * eye), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.down_trainable.grad, torch.linalg.inv(u.T @ u + 1e-6 * eye) @ ge, rtol=1e-4, atol=1e-5)
    assert (layer.up_trainable.grad - gb).abs().max() > 1e-3 * gb.abs().max()
    assert (layer.down_trainable.grad - ge).abs().max() > 1e-3 * ge.abs().max()


# ------------------------------------------------------------------------------------------------ through the loop

def _config(data, model_dir, out, stage: str, **options):
    from trainers.loop import TrainConfig

    extra = {k: options.pop(k) for k in ("prior_data", "prior_trigger", "trigger", "lr", "steps") if k in options}
    return TrainConfig(data=str(data), out=str(out), model=str(model_dir), method=f"b4m-{stage}", batch_size=2,
                       checkpoint_every=1000, seed=0, **{"steps": 3, "lr": 1e-2, **extra},
                       method_options={"rank": 2, **options})


def test_content_run_trains_its_own_half_from_its_data_and_the_other_from_the_auxiliary_set(
        data, tiny_model_dir, tmp_path, fresh_accelerator_state):
    from trainers.events import read_events
    from trainers.loop import train

    only_data = B4MMethod("content")
    train(_config(data, tiny_model_dir, tmp_path / "a.safetensors", "content", trigger="sks"), only_data,
          tmp_path / "a")
    layers = list(only_data.layers.values())
    assert all(l.down_trainable.abs().sum() > 0 for l in layers)  # E learns from the content images
    assert all(torch.count_nonzero(l.up_trainable) == 0 for l in layers)  # B: no auxiliary set, no gradient
    both = B4MMethod("content")
    train(_config(data, tiny_model_dir, tmp_path / "b.safetensors", "content", trigger="sks", prior_data=str(data)),
          both, tmp_path / "b")
    assert all(l.up_trainable.abs().sum() > 0 for l in both.layers.values())
    summary = next(e for e in read_events(tmp_path / "b") if e["event"] == "method")
    assert summary["stage"] == "content" and summary["trainable"] == sum(
        l.up_trainable.numel() + l.down_trainable.numel() for l in both.layers.values())


def test_stage_files_combine_exactly_and_export_loads_in_diffusers(data, tiny_model_dir, tmp_path,
                                                                     fresh_accelerator_state):
    from accelerate.state import AcceleratorState

    from adapters.lora.files import load_lora
    from models.loading import load_model
    from adapters.lora.apply import merge_lora
    from trainers.loop import train

    content, style = tmp_path / "content.safetensors", tmp_path / "style.safetensors"
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]  # Linear and Conv2d
    train(_config(data, tiny_model_dir, content, "content", trigger="sks", prior_data=str(data), targets=targets),
          B4MMethod("content"), tmp_path / "c")
    AcceleratorState._reset_state(reset_partial_state=False)
    train(_config(data, tiny_model_dir, style, "style", trigger="wz", prior_data=str(data), format="kohya",
                  targets=targets),
          B4MMethod("style"), tmp_path / "s")
    c, s = read_plp_file(content), read_plp_file(style)
    assert c.stage == "content" and s.stage == "style" and c.content_trigger == "sks" and s.style_trigger == "wz"

    AcceleratorState._reset_state(reset_partial_state=False)
    combined = B4MMethod("combine")
    out = tmp_path / "combined.safetensors"
    train(_config(data, tiny_model_dir, out, "combine", steps=1, lr=1e-12, content=str(content), style=str(style),
                  prior_data=str(data), prior_trigger="wz", trigger="sks"), combined, tmp_path / "m")
    for name, layer in combined.layers.items():  # started from B of the style run and E of the content run
        torch.testing.assert_close(layer.up_trainable.detach(), s.layers[name].b, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(layer.down_trainable.detach(), c.layers[name].e, atol=1e-8, rtol=1e-5)
        assert torch.equal(layer.up_frozen, c.layers[name].a) and torch.equal(layer.down_frozen, s.layers[name].c)
    made = read_plp_file(out)
    assert made.stage == "combine" and (made.content_trigger, made.style_trigger) == ("sks", "wz")

    # The exported rank-2r file reproduces ΔW, through diffusers' own loader.
    adapter = load_lora(out)
    for name, layer in combined.layers.items():
        torch.testing.assert_close(adapter.layers[f"unet.{name}"].delta(), layer.delta_weight(), atol=1e-6, rtol=1e-5)
    pipe = load_model(tiny_model_dir).pipe

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("sks wz a red circle", num_inference_steps=2, generator=g, output_type="np").images[0]

    base = image()
    pipe.load_lora_weights(str(out))
    theirs = image()
    pipe.unload_lora_weights()
    merge_lora(pipe, adapter)
    ours = image()
    assert np.abs(theirs - base).max() > 1e-3
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_combining_files_with_other_frozen_halves_is_refused(data, tiny_model_dir, tmp_path, fresh_accelerator_state):
    from accelerate.state import AcceleratorState

    from trainers.loop import train

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(_config(data, tiny_model_dir, a, "content", steps=1, seed=1), B4MMethod("content"), tmp_path / "ra")
    AcceleratorState._reset_state(reset_partial_state=False)
    train(_config(data, tiny_model_dir, b, "style", steps=1, seed=2), B4MMethod("style"), tmp_path / "rb")
    AcceleratorState._reset_state(reset_partial_state=False)
    with pytest.raises(UserError, match="seeds differ"):
        train(_config(data, tiny_model_dir, tmp_path / "c.safetensors", "combine", content=str(a), style=str(b)),
              B4MMethod("combine"), tmp_path / "rc")
    assert not (tmp_path / "c.safetensors").exists()


def test_cli_stages_auxiliary_sets_formats_and_refusal(data, tiny_model_dir, tmp_path):
    from conftest import run_cli

    common = ["--model", str(tiny_model_dir), "--steps", "2", "--rank", "2", "--batch-size", "2"]
    content, style = tmp_path / "content.safetensors", tmp_path / "style.safetensors"
    # --aux-microworld is for the micro model only (tests/test_sdxl_trainers.py checks its refusal elsewhere)
    done = run_cli("train", "b4m-content", "--data", str(data), "--out", str(content), "--trigger", "sks",
                   "--aux", str(data), "--run-dir", str(tmp_path / "rc"), *common)
    assert done.returncode == 0, done.stderr
    assert "PLP layers" in done.stdout
    done = run_cli("train", "b4m-style", "--data", str(data), "--out", str(style), "--trigger", "wz",
                   "--aux", str(data), "--format", "kohya", "--run-dir", str(tmp_path / "rs"), *common)
    assert done.returncode == 0, done.stderr
    combined = tmp_path / "combined.safetensors"
    done = run_cli("train", "b4m-combine", "--content", str(content), "--style", str(style), "--content-data",
                   str(data), "--style-data", str(data), "--out", str(combined), "--run-dir", str(tmp_path / "rm"),
                   *common)
    assert done.returncode == 0, done.stderr
    made = read_plp_file(combined)
    assert (made.stage, made.content_trigger, made.style_trigger) == ("combine", "sks", "wz")

    other = tmp_path / "other.safetensors"
    assert run_cli("train", "b4m-style", "--data", str(data), "--out", str(other), "--plp-seed", "5",
                   "--run-dir", str(tmp_path / "ro"), *common).returncode == 0
    refused = run_cli("train", "b4m-combine", "--content", str(content), "--style", str(other), "--style-data",
                      str(data), "--data", str(data), "--out", str(tmp_path / "x.safetensors"), *common)
    assert refused.returncode != 0 and "seeds differ" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x.safetensors").exists()
