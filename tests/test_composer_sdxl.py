"""LoRA-Composer on SDXL and SD 2.x: the exactness checks of ``test_composer.py`` on the tiny random pipelines.

The tiny SDXL has what makes SDXL different for the composer: two text encoders (hidden states concatenated, a
pooled embedding), ``text_time`` added conditioning, two transformer blocks per attention level, and a top level
without attention. Sizes are non-square (48×32 and 32×48 px: 16×24 latents, attention at 8×12), and one mask check
runs on an odd latent, as SDXL's 1000-px images give.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from test_composer import (LEFT, RIGHT, _expected_allowed, _pixels, _random_adapter, assert_concept_kv_equal_merged,
                           region_calls)

WIDTH, HEIGHT = 48, 32
PROMPT = "a red circle on the left, gray background"


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    from models.loading import load_model

    model = load_model(tiny_sdxl_dir)
    assert type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    return model


@pytest.fixture(scope="module")
def sd2(tiny_sd2_dir):
    from models.loading import load_model

    model = load_model(tiny_sd2_dir)
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    return model


def _base_image(pipe, prompt: str, seed: int, width: int = WIDTH, height: int = HEIGHT):
    with torch.inference_mode():
        return pipe(prompt=prompt, num_inference_steps=6, guidance_scale=4.0, width=width, height=height,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def _assert_zero_concepts_reproduce_the_base_pipeline(pipe) -> None:
    """As ``test_composer``'s: the region processors run, the image is the base pipeline's bit for bit."""
    from pipelines.lora_composer import LoraComposerPipeline

    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with region_calls() as calls:
        composed = LoraComposerPipeline(pipe)(PROMPT, [], steps=6, guidance=4.0, seed=11, width=WIDTH, height=HEIGHT)
    base = _base_image(pipe, PROMPT, 11)
    assert calls, "the region processors were not in the UNet during the composition"
    assert composed.image.size == (WIDTH, HEIGHT)
    assert np.array_equal(_pixels(composed.image), _pixels(base))
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before, "processors not restored"


def test_zero_concepts_reproduce_the_base_sdxl_pipeline(sdxl):
    _assert_zero_concepts_reproduce_the_base_pipeline(sdxl.pipe)


def test_zero_concepts_reproduce_the_base_sd2_pipeline(sd2):
    _assert_zero_concepts_reproduce_the_base_pipeline(sd2.pipe)


def test_one_full_image_box_is_plain_lora_generation_on_sdxl(sdxl, tmp_path):
    """A concept whose box is the whole image, prompted like the global prompt, is exactly its cross-attention LoRA
    applied to the whole model (the pooled embedding and time ids are the global prompt's in both)."""
    from adapters.lora.files import save_lora
    from pipelines.composition import ConceptSpec, Mechanisms
    from pipelines.generation import adapters_applied
    from pipelines.lora_composer import LoraComposerPipeline, load_concept

    adapter = _random_adapter(sdxl.pipe, seed=1, scale=0.3)
    adapter.layers = {k: v for k, v in adapter.layers.items() if ".attn2." in k}  # what the composer applies
    path = save_lora(adapter, tmp_path / "cross.safetensors")
    prompt = "sks a blue square in the center, gray background"
    concept = load_concept(ConceptSpec(lora=str(path), box=(0, 0, 1, 1), prompt=prompt), sdxl.pipe)
    composed = LoraComposerPipeline(sdxl.pipe)(prompt, [concept], steps=6, guidance=4.0, seed=5, width=WIDTH,
                                               height=HEIGHT, mechanisms=Mechanisms(reinit=False, isolation=False))
    with adapters_applied(sdxl, ((str(path), 1.0),)):
        plain = _base_image(sdxl.pipe, prompt, 5)
    base = _base_image(sdxl.pipe, prompt, 5)
    assert np.abs(_pixels(composed.image) - _pixels(plain)).max() <= 1
    assert np.abs(_pixels(plain) - _pixels(base)).max() > 10, "the adapter has no visible effect: proves nothing"


def _encoder_weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("text_encoder", "text_encoder_2")
            for key, value in getattr(pipe, name).state_dict().items()}


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
def test_sdxl_concept_keys_and_values_equal_a_merged_model(sdxl, tmp_path, file_format):
    """K/V from the concept's deltas on its region prompt encoded with its text-encoder LoRA (both encoders) equal
    those of the model with the whole LoRA merged into its weights."""
    from adapters.lora.files import save_lora
    from pipelines.composition import ConceptSpec
    from pipelines.lora_composer import LoraComposerPipeline, load_concept
    from pipelines.region_attention import RegionState

    pipe = sdxl.pipe
    # pipe=: kohya's SDXL names number the UNet by the model's own block layout (the tiny one is not SDXL base's)
    path = save_lora(_random_adapter(pipe), tmp_path / f"concept-{file_format}.safetensors", format=file_format,
                     pipe=pipe)
    strength, prompt = 0.7, "sks a green triangle, gray background"
    concept = load_concept(ConceptSpec(lora=str(path), box=LEFT, prompt=prompt, strength=strength), pipe)
    assert concept.text_encoder is not None and concept.text_encoder.components == {"text_encoder", "text_encoder_2"}
    assert concept.skipped == {"self-attention": 2, "feed-forward": 1}

    composer = LoraComposerPipeline(pipe)
    weights = _encoder_weights(pipe)
    state = RegionState(boxes=[LEFT], latent_hw=(16, 24), cfg=False)
    state.concept_embeds = composer.concept_embeddings([concept], "")
    state.deltas = composer.cross_deltas([concept])
    after = _encoder_weights(pipe)
    assert all(torch.equal(weights[k], after[k]) for k in weights), "text encoders not restored exactly"
    assert state.concept_embeds.shape[-1] == pipe.unet.config.cross_attention_dim  # both encoders' hidden states
    assert_concept_kv_equal_merged(pipe, composer, state, concept, path, prompt, strength)  # 2 blocks per level
    # each encoder's LoRA shows in its own part of the concatenated hidden states
    fresh = composer.encode(prompt, "", False).positive[0]
    width_1 = pipe.text_encoder.config.hidden_size
    concept_embeds = state.concept_embeds[0, 1]
    for part, name in ((slice(None, width_1), "text_encoder"), (slice(width_1, None), "text_encoder_2")):
        assert not torch.allclose(fresh[:, part], concept_embeds[:, part]), f"{name}'s LoRA had no effect"


def _attention_grids(unet, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The grids of the UNet levels that have attention, by convolution arithmetic (kernel 3, stride 2, padding 1)."""
    config = unet.config
    levels = {i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
    deepest = len(config.up_block_types) - 1
    levels |= {deepest - i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    if "CrossAttn" in (config.mid_block_type or ""):
        levels.add(len(config.down_block_types) - 1)
    grids, (h, w) = [], latent_hw
    for level in range(len(config.down_block_types)):
        if level in levels:
            grids.append((h, w))
        h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    return grids


def _box_union(boxes, h: int, w: int) -> torch.Tensor:
    """Brute force: is the cell's centre inside some box?"""
    return torch.tensor([any(x0 <= (c + 0.5) / w < x1 and y0 <= (r + 0.5) / h < y1 for x0, y0, x1, y1 in boxes)
                         for r in range(h) for c in range(w)])


@pytest.mark.parametrize("latent_hw", [(16, 24), (15, 21)])
def test_isolation_and_injection_masks_are_right_at_sdxl_levels(sdxl, tmp_path, latent_hw):
    """Every attn1/attn2 module (two per level) runs its processor with the masks of its own grid; the top level,
    without attention, asks for none; injection changes exactly the cells inside the boxes."""
    from adapters.lora.files import save_lora
    from pipelines.composition import ConceptSpec
    from pipelines.lora_composer import LoraComposerPipeline, load_concept
    from pipelines.region_attention import (RegionCrossAttnProcessor, RegionSelfAttnProcessor, RegionState,
                                            region_processors)

    pipe = sdxl.pipe
    boxes = [LEFT, RIGHT, (0.3, 0.3, 0.7, 0.7)]  # the third overlaps both
    path = save_lora(_random_adapter(pipe, seed=2), tmp_path / "c.safetensors")
    concepts = [load_concept(ConceptSpec(lora=str(path), box=box, prompt=f"sks a red shape {i}"), pipe)
                for i, box in enumerate(boxes)]
    composer = LoraComposerPipeline(pipe)
    state = RegionState(boxes=boxes, latent_hw=latent_hw, cfg=False)
    state.concept_embeds = composer.concept_embeddings(concepts, "")
    state.deltas = composer.cross_deltas(concepts)
    seen, changed, self_calls = {}, {}, []
    original_allowed, original_inject = RegionState.allowed, RegionCrossAttnProcessor._inject
    original_self = RegionSelfAttnProcessor.__call__

    def spy_allowed(self, tokens, device):
        seen[tokens] = original_allowed(self, tokens, device)
        return seen[tokens]

    def spy_inject(self, attn, query, out_global, batch, tokens):
        out = original_inject(self, attn, query, out_global, batch, tokens)
        changed[self.name] = (tokens, (out - out_global).abs().amax((0, 2)) > 0)
        return out

    def spy_self(self, *args, **kwargs):
        self_calls.append(self.name)
        return original_self(self, *args, **kwargs)

    scale = pipe.vae_scale_factor
    conditioning = composer.unet_conditioning(composer.encode("three shapes", "", False), latent_hw[0] * scale,
                                              latent_hw[1] * scale)
    original = pipe.unet.attn_processors
    modules = [n[: -len(".processor")] for n in original]  # before set_attn_processor empties the dict
    RegionState.allowed, RegionCrossAttnProcessor._inject = spy_allowed, spy_inject
    RegionSelfAttnProcessor.__call__ = spy_self
    try:
        pipe.unet.set_attn_processor(region_processors(pipe.unet, state))
        with torch.no_grad():
            pipe.unet(torch.randn(1, 4, *latent_hw), 500, **conditioning.unet_kwargs())
    finally:
        RegionState.allowed, RegionCrossAttnProcessor._inject = original_allowed, original_inject
        RegionSelfAttnProcessor.__call__ = original_self
        pipe.unet.set_attn_processor(original)
    assert sorted(self_calls) == sorted(n for n in modules if n.endswith("attn1")), "an attn1 without isolation"
    assert sorted(changed) == sorted(n for n in modules if n.endswith("attn2")), "an attn2 without injection"
    grids = _attention_grids(pipe.unet, latent_hw)
    assert latent_hw not in grids and len(grids) >= 1  # the top level has no attention
    by_tokens = {h * w: (h, w) for h, w in grids}
    assert sorted(seen) == sorted(by_tokens)
    for tokens, mask in seen.items():
        h, w = by_tokens[tokens]
        assert torch.equal(mask.cpu(), _expected_allowed(boxes, h, w)), f"wrong isolation mask at {h}x{w}"
        assert not mask.all(), f"no isolation at {h}x{w}"
    for name, (tokens, cells) in changed.items():
        h, w = by_tokens[tokens]
        assert torch.equal(cells.cpu(), _box_union(boxes, h, w)), f"{name}: injection outside/short of the boxes"


@pytest.mark.parametrize("width, height", [(1024, 768), (768, 1024), (1344, 768), (1000, 1000)])
def test_grid_and_box_masks_fit_real_sdxl_sizes(width, height):
    """SDXL's UNet has attention at its 2nd and 3rd levels (1024×768 → 96×128 latent → 48×64 and 24×32)."""
    from pipelines.region_attention import box_masks, grid_of

    boxes = [LEFT, RIGHT, (0.3, 0.3, 0.7, 0.7)]
    latent = (height // 8, width // 8)
    h, w = latent
    for _ in range(2):
        h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
        assert grid_of(h * w, latent) == (h, w)
        masks = box_masks(boxes, h, w)
        assert masks.shape == (len(boxes), h * w)
        for n, box in enumerate(boxes):
            assert torch.equal(masks[n].bool(), _box_union([box], h, w)), f"box {n} wrong at {h}x{w}"
    if (width, height) == (1024, 768):
        assert (h, w) == (24, 32)


def _unet_calls(unet):
    """Every UNet call's batch size and SDXL added conditions, recorded by a forward pre-hook."""
    calls = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append((args[0].shape[0], {k: v.detach().clone() for k, v in added.items()}))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def _two_concept_spec(path, **mechanisms):
    from pipelines.composition import CompositionSpec, ConceptSpec, Mechanisms

    return CompositionSpec(prompt="two shapes, gray background", steps=6, guidance=4.0, seed=7, width=32, height=48,
                           concepts=(ConceptSpec(lora=str(path), box=LEFT, prompt="sks a red square", strength=1.2),
                                     ConceptSpec(lora=str(path), box=RIGHT, prompt="sks a blue ring", strength=0.8)),
                           mechanisms=Mechanisms(**mechanisms))


def test_sdxl_composition_runs_end_to_end_with_reinit_and_optimisation(sdxl, tmp_path):
    """compose() on SDXL at 32×48: re-initialisation and latent optimisation call the UNet directly with the
    conditioning of the denoising loop's conditional half (the global prompt's pooled embedding, time ids
    (48, 32, 0, 0, 48, 32))."""
    from dataclasses import replace

    from adapters.lora.files import save_lora
    from pipelines.lora_composer import LoraComposerPipeline, compose

    pipe = sdxl.pipe
    path = save_lora(_random_adapter(pipe, seed=3, scale=0.3), tmp_path / "c.safetensors")
    spec = _two_concept_spec(path, reinit=True, latent_optimisation=True)
    calls, handle = _unet_calls(pipe.unet)
    try:
        out = compose(sdxl, spec)
    finally:
        handle.remove()
    assert out.image.size == (32, 48)
    assert out.optimisation_log and out.optimisation_log[0]["step"] == 0 and len(out.optimisation_log) <= 3
    assert all({"enhance", "fill", "region", "total"} <= set(r) for r in out.optimisation_log)
    assert out.optimisation_log[0]["region"] > 0
    direct = [added for batch, added in calls if batch == 1]
    loop = [added for batch, added in calls if batch == 2]
    assert len(direct) == 1 + len(out.optimisation_log) and len(loop) == spec.steps
    pooled = LoraComposerPipeline(pipe).encode(spec.prompt, spec.negative_prompt, True).pooled
    for added in direct:
        assert added["time_ids"].tolist() == [[48, 32, 0, 0, 48, 32]]
        torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
        for name in ("time_ids", "text_embeds"):  # the conditional half of the denoising loop's batch
            torch.testing.assert_close(added[name], loop[0][name][1:], rtol=0, atol=0)
    plain = compose(sdxl, replace(spec, concepts=()))
    assert np.abs(_pixels(out.image) - _pixels(plain.image)).max() > 10, "the concepts changed nothing"


def test_sd2_composition_runs_end_to_end(sd2, tmp_path):
    """compose() on a v-prediction, zero-terminal-SNR SD 2.x model, re-initialisation and optimisation on."""
    from adapters.lora.files import save_lora
    from pipelines.lora_composer import compose

    path = save_lora(_random_adapter(sd2.pipe, seed=4, scale=0.3), tmp_path / "c.safetensors")
    out = compose(sd2, _two_concept_spec(path, reinit=True, latent_optimisation=True))
    assert out.image.size == (32, 48)
    assert out.optimisation_log and all(math.isfinite(r["total"]) for r in out.optimisation_log)
    assert _pixels(out.image).std() > 0
