"""LoRA-Composer's mechanics: exact base reproduction, per-concept keys/values, isolation masks, re-initialisation,
latent optimisation, and the composition file."""
from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from conftest import MICRO_MODEL, REPO

pytestmark = pytest.mark.skipif(not (MICRO_MODEL / "model_index.json").is_file(), reason="micro model not shipped")
CONCEPTS = REPO / "assets" / "concepts"
LEFT, RIGHT = (0.02, 0.05, 0.48, 0.95), (0.52, 0.05, 0.98, 0.95)


@pytest.fixture(scope="module")
def model():
    from models.loading import load_model

    loaded = load_model(MICRO_MODEL)
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


def _random_adapter(pipe, seed: int = 0, scale: float = 0.3):
    """A LoRA touching cross-attention K/V/out, the text encoder(s), and (skipped) self-attention and feed-forward;
    also used by ``test_composer_sdxl.py``."""
    from adapters.lora.files import LoraAdapter, LoraLayer, lora_targets

    targets = lora_targets(pipe)
    g = torch.Generator().manual_seed(seed)
    wanted = [n for n in targets if n.startswith("unet.") and ".attn2.to_" in n and ".to_q" not in n]
    wanted += [n for n in targets if n.startswith("text_encoder") and n.endswith(("q_proj", "v_proj"))]  # SDXL: both
    wanted += [n for n in targets if n.endswith("attn1.to_q")][:2] + [n for n in targets if n.endswith("ff.net.2")][:1]
    layers = {}
    for name in wanted:
        out_f, in_f = targets[name].weight.shape[:2]
        layers[name] = LoraLayer(down=torch.randn(4, in_f, generator=g) * scale,
                                 up=torch.randn(out_f, 4, generator=g) * scale, alpha=4.0)
    return LoraAdapter(layers=layers, metadata={"atelier.trigger_words": "sks"})


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@contextmanager
def region_calls():
    """The names of the cross-attention region processors that ran inside the block."""
    from pipelines.region_attention import RegionCrossAttnProcessor

    calls: list[str] = []
    original_call = RegionCrossAttnProcessor.__call__

    def spy(self, *args, **kwargs):
        calls.append(self.name)
        return original_call(self, *args, **kwargs)

    RegionCrossAttnProcessor.__call__ = spy
    try:
        yield calls
    finally:
        RegionCrossAttnProcessor.__call__ = original_call


def test_zero_concepts_reproduce_the_base_pipeline(model):
    from pipelines.lora_composer import LoraComposerPipeline

    pipe = model.pipe
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with region_calls() as calls:
        composed = LoraComposerPipeline(pipe)("a red circle on the left, gray background", [], steps=6,
                                              guidance=4.0, seed=11)
    with torch.inference_mode():
        base = pipe(prompt="a red circle on the left, gray background", num_inference_steps=6, guidance_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(11)).images[0]
    assert calls, "the region processors were not in the UNet during the composition"
    assert np.array_equal(_pixels(composed.image), _pixels(base))
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before, "processors not restored"


def test_one_full_image_box_is_plain_lora_generation(model, tmp_path):
    """A concept whose box is the whole image, prompted like the global prompt, is exactly the LoRA applied."""
    from adapters.lora.files import save_lora
    from pipelines.composition import ConceptSpec, Mechanisms
    from pipelines.generation import adapters_applied
    from pipelines.lora_composer import LoraComposerPipeline, load_concept

    adapter = _random_adapter(model.pipe, seed=1, scale=0.15)
    adapter.layers = {k: v for k, v in adapter.layers.items() if ".attn2." in k}  # what the composer applies
    path = save_lora(adapter, tmp_path / "cross.safetensors")
    prompt = "sks a blue square in the center, gray background"
    concept = load_concept(ConceptSpec(lora=str(path), box=(0, 0, 1, 1), prompt=prompt), model.pipe)
    composed = LoraComposerPipeline(model.pipe)(prompt, [concept], steps=6, guidance=4.0, seed=5,
                                                mechanisms=Mechanisms(reinit=False, isolation=False))
    with adapters_applied(model, ((str(path), 1.0),)), torch.inference_mode():
        plain = model.pipe(prompt=prompt, num_inference_steps=6, guidance_scale=4.0,
                           generator=torch.Generator("cpu").manual_seed(5)).images[0]
    with torch.inference_mode():
        base = model.pipe(prompt=prompt, num_inference_steps=6, guidance_scale=4.0,
                          generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(_pixels(composed.image) - _pixels(plain)).max() <= 1
    assert np.abs(_pixels(plain) - _pixels(base)).max() > 10, "the adapter has no visible effect; the test proves nothing"


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
def test_concept_keys_and_values_equal_a_merged_unet(model, tmp_path, file_format):
    from adapters.lora.files import save_lora
    from pipelines.composition import ConceptSpec
    from pipelines.lora_composer import LoraComposerPipeline, load_concept
    from pipelines.region_attention import RegionState

    pipe = model.pipe
    path = save_lora(_random_adapter(pipe), tmp_path / f"concept-{file_format}.safetensors", format=file_format)
    strength, prompt = 0.7, "sks a green triangle, gray background"
    concept = load_concept(ConceptSpec(lora=str(path), box=LEFT, prompt=prompt, strength=strength), pipe)
    assert concept.text_encoder is not None and concept.cross_deltas
    assert concept.skipped == {"self-attention": 2, "feed-forward": 1}
    assert "self-attention 2" in concept.skipped_note() and "feed-forward 1" in concept.skipped_note()

    composer = LoraComposerPipeline(pipe)
    state = RegionState(boxes=[LEFT], latent_hw=(16, 16), cfg=False)
    state.concept_embeds = composer.concept_embeddings([concept], "")
    state.deltas = composer.cross_deltas([concept])
    assert_concept_kv_equal_merged(pipe, composer, state, concept, path, prompt, strength)
    # the text encoder's exact weights are back after the concept's encoding
    fresh = composer.encode(prompt, "", False).positive
    assert not torch.allclose(fresh, state.concept_embeds[0, 1][None]), "the text-encoder LoRA had no effect"


def assert_concept_kv_equal_merged(pipe, composer, state, concept, path, prompt: str, strength: float) -> None:
    """Every attn2 layer's concept keys/values (its deltas on its region prompt encoded with its text-encoder LoRA)
    and output projection equal those of the model with the whole LoRA merged into its weights."""
    from adapters.lora.files import load_lora
    from adapters.lora.apply import merge_lora, unmerge_lora
    from pipelines.region_attention import _project, region_processors

    processors = region_processors(pipe.unet, state)
    layer_names = sorted(concept.cross_deltas)
    assert len(layer_names) == sum(name.endswith("attn2.processor") for name in processors)
    got = {}
    with torch.no_grad():
        for layer in layer_names:
            attn = pipe.unet.get_submodule(layer)
            k, v = processors[f"{layer}.processor"]._concept_kv(attn, 1, torch.float32, torch.device("cpu"))
            h = torch.randn(1, 5, attn.to_out[0].in_features, generator=torch.Generator().manual_seed(3))
            out = _project(attn.to_out[0], state.deltas[layer].to_out, h[None])[0]
            got[layer] = (k, v, h, out)
        merge_lora(pipe, load_lora(path, pipe), strength)
        try:
            encoded = composer.encode(prompt, "", False).positive
            for layer, (k, v, h, out) in got.items():
                attn = pipe.unet.get_submodule(layer)
                torch.testing.assert_close(k, attn.to_k(encoded), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(v, attn.to_v(encoded), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(out, attn.to_out[0](h), rtol=1e-4, atol=1e-5)
        finally:
            unmerge_lora(pipe, load_lora(path, pipe), strength)


def _expected_allowed(boxes, h, w):
    """Brute force over cells: may the query cell attend to the key cell?"""
    def owners(index):
        r, c = divmod(index, w)
        y, x = (r + 0.5) / h, (c + 0.5) / w
        return {n for n, (x0, y0, x1, y1) in enumerate(boxes) if x0 <= x < x1 and y0 <= y < y1}

    own = [owners(i) for i in range(h * w)]
    return torch.tensor([[not (oq and ok and not (oq & ok)) for ok in own] for oq in own])


def test_isolation_masks_are_right_at_every_attention_resolution(model):
    from pipelines.region_attention import RegionSelfAttnProcessor, RegionState, region_processors

    pipe = model.pipe
    boxes = [LEFT, RIGHT, (0.3, 0.3, 0.7, 0.7)]  # the third overlaps both
    state = RegionState(boxes=boxes, latent_hw=(16, 32), cfg=False)
    seen = {}
    original_allowed = RegionState.allowed

    def spy(self, tokens, device):
        mask = original_allowed(self, tokens, device)
        seen[tokens] = mask
        return mask

    calls = []
    original_call = RegionSelfAttnProcessor.__call__

    def count(self, *args, **kwargs):
        calls.append(self.name)
        return original_call(self, *args, **kwargs)

    original = pipe.unet.attn_processors
    attn1 = [n for n in original if n.endswith("attn1.processor")]
    RegionState.allowed, RegionSelfAttnProcessor.__call__ = spy, count
    try:
        pipe.unet.set_attn_processor(region_processors(pipe.unet, state))
        with torch.no_grad():
            pipe.unet(torch.randn(1, 4, 16, 32), 500, encoder_hidden_states=torch.randn(1, 77, 64))
    finally:
        RegionState.allowed, RegionSelfAttnProcessor.__call__ = original_allowed, original_call
        pipe.unet.set_attn_processor(original)
    assert len(calls) == len(attn1), "not every self-attention layer ran the isolation processor"
    config = pipe.unet.config
    levels = {i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
    if "CrossAttn" in (config.mid_block_type or ""):
        levels.add(len(config.down_block_types) - 1)
    assert sorted(seen) == sorted((16 >> i) * (32 >> i) for i in levels)  # every resolution with attention
    for tokens, mask in seen.items():
        h = int((tokens // 2) ** 0.5)
        assert torch.equal(mask.cpu(), _expected_allowed(boxes, h, 2 * h)), f"wrong mask at {h}x{2 * h}"
        assert not mask.all(), f"no isolation at {h}x{2 * h}"


def test_isolation_stops_information_between_boxes(model):
    """Changing what lies in box B changes nothing in box A's self-attention output, unless isolation is off."""
    from pipelines.region_attention import RegionSelfAttnProcessor, RegionState, box_masks

    attn = next(m for n, m in model.pipe.unet.named_modules() if n.endswith("attn1"))
    dim = attn.to_q.in_features
    x = torch.randn(1, 16 * 32, dim, generator=torch.Generator().manual_seed(0))
    masks = box_masks([LEFT, RIGHT], 16, 32)
    changed = x.clone()
    changed[0, masks[1].bool()] += 3.0
    for isolate in (True, False):
        processor = RegionSelfAttnProcessor(RegionState(boxes=[LEFT, RIGHT], latent_hw=(16, 32), isolate=isolate),
                                            "attn1")
        with torch.no_grad():
            a, b = processor(attn, x), processor(attn, changed)
        in_a = masks[0].bool()
        difference = (a[0, in_a] - b[0, in_a]).abs().max()
        if isolate:
            assert difference < 1e-5
        else:
            assert difference > 1e-2


def test_reinitialisation_moves_the_best_patch_and_keeps_statistics():
    from pipelines.composer_latents import box_cells, reinitialise

    noise = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(2))
    maps = torch.zeros(1, 4, 8)
    maps[0, 1:3, 5:7] = 1.0  # the trigger responds most at rows 1-2, cols 5-6 of the coarse grid
    box = (0.0, 0.25, 0.25, 0.75)  # 2x2 coarse cells, 8x8 latent cells
    out = reinitialise(noise, maps, [box])
    torch.testing.assert_close(out.mean((-2, -1)), noise.mean((-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((-2, -1)), noise.std((-2, -1)), atol=1e-5, rtol=1e-5)
    top, left, rows, cols = box_cells(box, 16, 32)
    moved = out[..., top:top + rows, left:left + cols].flatten()
    source = noise[..., 4:4 + rows, 20:20 + cols].flatten()  # coarse (1, 5) → latent (4, 20)
    assert torch.corrcoef(torch.stack([moved, source]))[0, 1] > 0.999
    assert not torch.allclose(out, noise)


def test_latent_optimisation_lowers_the_attention_losses(model, tmp_path):
    from adapters.lora.files import save_lora
    from pipelines.composer_latents import composer_losses
    from pipelines.composition import ConceptSpec
    from pipelines.lora_composer import LoraComposerPipeline, load_concept, trigger_token_indices
    from pipelines.region_attention import RegionState

    pipe = model.pipe
    path = save_lora(_random_adapter(pipe, scale=0.1), tmp_path / "c.safetensors")
    concepts = [load_concept(ConceptSpec(lora=str(path), box=box, prompt=f"sks a red {shape}"), pipe)
                for box, shape in ((LEFT, "square"), (RIGHT, "circle"))]
    composer = LoraComposerPipeline(pipe)
    state = RegionState(boxes=[c.box for c in concepts], latent_hw=(16, 32), cfg=False)
    state.concept_embeds = composer.concept_embeddings(concepts, "")
    state.deltas = composer.cross_deltas(concepts)
    state.token_indices = [trigger_token_indices(pipe.tokenizer, c.prompt, c.trigger) for c in concepts]
    assert state.token_indices[0] == [1]  # "sks" is the first token after the start token
    scale = pipe.vae_scale_factor
    embeds = composer.unet_conditioning(composer.encode("a red square on the left and a red circle on the right", "",
                                                        False), 16 * scale, 32 * scale)
    pipe.scheduler.set_timesteps(20)
    t = pipe.scheduler.timesteps[2]

    def loss(z):
        composer._unet_maps(state, z, t, embeds, pipe.scheduler)
        value = composer_losses(state.cross_maps, state.self_maps, state.boxes, state.latent_hw)
        state.clear_maps()
        return value

    z = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with composer.processors(state):
        before = loss(z)
        assert set(before) == {"enhance", "fill", "region", "total"} and before["region"] > 0
        (grad,) = torch.autograd.grad(before["total"], z)
        with torch.no_grad():
            after = loss((z - 2.0 * grad).detach())
    assert float(after["total"]) < float(before["total"].detach())


def test_optimisation_is_logged_when_switched_on(model, tmp_path):
    from adapters.lora.files import save_lora
    from pipelines.composition import ConceptSpec, Mechanisms
    from pipelines.lora_composer import LoraComposerPipeline, load_concept

    path = save_lora(_random_adapter(model.pipe, scale=0.1), tmp_path / "c.safetensors")
    concept = load_concept(ConceptSpec(lora=str(path), box=LEFT, prompt="sks a red square"), model.pipe)
    out = LoraComposerPipeline(model.pipe)("a red square, gray background", [concept], steps=6, guidance=4.0,
                                           seed=1, mechanisms=Mechanisms(latent_optimisation=True))
    assert out.optimisation_log and out.optimisation_log[0]["step"] == 0
    assert all({"enhance", "fill", "region", "total"} <= set(r) for r in out.optimisation_log)
    assert len(out.optimisation_log) <= 3  # first half of 6 steps at most


# ------------------------------------------------------------------------------------------- composition files

GOOD = {"prompt": "two shapes, gray background", "steps": 4, "guidance": 4.0, "seed": 3, "width": 128, "height": 64,
        "concepts": [{"lora": "a.safetensors", "box": [0, 0, 0.5, 1], "prompt": "zwx a red heart"}]}


@pytest.mark.parametrize("change, field", [
    ({"concepts": [{"lora": "a.safetensors", "box": [0, 0, 1.2, 1], "prompt": "x"}]}, "concepts[0].box: x1"),
    ({"concepts": [{"lora": "a.safetensors", "box": [0.6, 0, 0.5, 1], "prompt": "x"}]}, "concepts[0].box: x0 must"),
    ({"concepts": [{"lora": "a.safetensors", "box": [0, 0.5, 1, 0.5], "prompt": "x"}]}, "concepts[0].box: y0 must"),
    ({"concepts": [{"lora": "a.safetensors", "box": [0, 0, 1], "prompt": "x"}]}, "concepts[0].box: must be four"),
    ({"concepts": [{"box": [0, 0, 1, 1], "prompt": "x"}]}, "concepts[0].lora: missing"),
    ({"concepts": [{"lora": "a.safetensors", "box": [0, 0, 1, 1], "prompt": " "}]}, "concepts[0].prompt"),
    ({"concepts": [{"lora": "a.safetensors", "box": [0, 0, 1, 1], "prompt": "x", "strength": "big"}]},
     "concepts[0].strength"),
    ({"concepts": [{"lora": "a.safetensors", "box": [0, 0, 1, 1], "prompt": "x", "colour": 1}]},
     "concepts[0].colour: unknown"),
    ({"steps": 0}, "steps"), ({"width": 100}, "width"), ({"seed": -1}, "seed"), ({"guidance": "7"}, "guidance"),
    ({"mechanisms": {"isolation": "yes"}}, "mechanisms.isolation"),
    ({"mechanisms": {"latent_optimisation": "sometimes"}}, "mechanisms.latent_optimisation"),
    ({"mechanisms": {"warp": True}}, "mechanisms.warp: unknown"),
    ({"prompt": None}, "prompt: missing"), ({"concepts": {}}, "concepts: must be a list"),
])
def test_invalid_compositions_are_refused_naming_the_field(change, field):
    from pipelines.composition import parse_composition
    from core.errors import UserError

    with pytest.raises(UserError, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_composition({**GOOD, **change})


def test_composition_round_trips_and_resolves_lora_paths(tmp_path):
    from pipelines.composition import parse_composition, read_composition, write_composition

    spec = parse_composition(GOOD, base=tmp_path)
    assert spec.concepts[0].lora == str(tmp_path / "a.safetensors")
    path = write_composition(spec, tmp_path / "sub" / "c.json")
    assert read_composition(path) == spec


def test_cli_composes_the_shipped_concepts_and_refuses_bad_specs(tmp_path):
    from conftest import run_cli

    if not (CONCEPTS / "heart.safetensors").is_file():
        pytest.skip("example concepts not shipped")
    spec = {**GOOD, "concepts": [
        {"lora": str(CONCEPTS / "heart.safetensors"), "box": list(LEFT), "prompt": "zwx a red heart in the center"},
        {"lora": str(CONCEPTS / "ring.safetensors"), "box": list(RIGHT), "prompt": "qwe a blue ring in the center"}]}
    (tmp_path / "composition.json").write_text(json.dumps(spec))
    ok = run_cli("compose", "--spec", str(tmp_path / "composition.json"), "--out", str(tmp_path / "c.png"),
                 "--overlay", str(tmp_path / "boxes.png"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "c.png").is_file() and (tmp_path / "boxes.png").is_file()
    record = json.loads((tmp_path / "c.json").read_text())  # the PNG's sidecar
    assert record["composition"]["concepts"][1]["box"] == list(RIGHT)

    bad = {**spec, "concepts": [{**spec["concepts"][0], "box": [0.5, 0, 0.5, 1]}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    refused = run_cli("compose", "--spec", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png"))
    assert refused.returncode == 2 and "concepts[0].box" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
