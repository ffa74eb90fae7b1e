"""The comparison benchmark's two additions: the trainer's full-decoder mode (Stable Signature baseline) and the
dwtDct helpers of ``bench/watermark_comparison.py``."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from core.errors import UserError


def test_full_decoder_mode_trains_every_decoder_parameter_and_lora_mode_none_of_the_base():
    from diffusers import AutoencoderKL

    from conftest import MICRO_MODEL
    from trainers.watermark_lora import WatermarkConfig, prepare_trainable

    vae = AutoencoderKL.from_pretrained(MICRO_MODEL, subfolder="vae")
    params, names = prepare_trainable(vae, WatermarkConfig(out="x.safetensors", mode="full_decoder"))
    decoder = {id(p) for p in vae.decoder.parameters()}
    assert not names and {id(p) for p in params} == decoder
    assert all(p.requires_grad == (id(p) in decoder) for p in vae.parameters())  # encoder & co. stay frozen

    vae = AutoencoderKL.from_pretrained(MICRO_MODEL, subfolder="vae")
    params, names = prepare_trainable(vae, WatermarkConfig(out="x.safetensors"))
    trainable = [n for n, p in vae.named_parameters() if p.requires_grad]
    assert names and trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in params) < sum(p.numel() for p in vae.decoder.parameters() if not p.requires_grad)


def test_unknown_mode_is_refused():
    from trainers.watermark_lora import WatermarkConfig

    with pytest.raises(UserError, match="full_decoder"):
        WatermarkConfig(out="x.safetensors", mode="decoder").validate()


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_full_decoder_training_writes_the_decoder_state_and_gives_the_model_its_decoder_back(tmp_path):
    from conftest import MICRO_MODEL
    from models.loading import load_model
    from core.safetensors_files import read_metadata
    from pipelines.watermark.extractor import BitExtractor, ExtractorConfig, save_extractor
    from pipelines.watermark.merge import is_watermark_file
    from trainers.watermark_lora import WatermarkConfig, decoder_state_applied, train_watermark

    torch.manual_seed(0)
    extractor = save_extractor(BitExtractor(ExtractorConfig(bits=16, filters=8, kernel=3)).eval(),
                               tmp_path / "extractor.safetensors")
    model = load_model(MICRO_MODEL)
    before = {k: v.clone() for k, v in model.pipe.vae.state_dict().items()}
    run = train_watermark(WatermarkConfig(out=str(tmp_path / "dec.safetensors"), key="beef", extractor=str(extractor),
                                          mode="full_decoder", latents=2, sample_steps=2, max_steps=2, batch_size=2,
                                          lr=1e-3), tmp_path / "run", model=model)
    assert run.result.step == 2
    after = model.pipe.vae.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    meta = read_metadata(tmp_path / "dec.safetensors")
    assert meta["atelier.method"] == "watermark-decoder" and meta["atelier.watermark_key"] == "beef"
    assert not is_watermark_file(tmp_path / "dec.safetensors")  # never offered or merged as a watermark LoRA
    decoder = model.pipe.vae.decoder
    with decoder_state_applied(model.pipe, tmp_path / "dec.safetensors"):
        changed = [k for k, v in decoder.state_dict().items() if not torch.equal(v, before[f"decoder.{k}"])]
        assert changed  # the trained weights are in
    assert all(torch.equal(v, before[f"decoder.{k}"]) for k, v in decoder.state_dict().items())


def _bench():
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("watermark_comparison", REPO / "bench" / "watermark_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dwtdct_round_trip_at_256_px_and_small_images_read_after_resizing():
    pytest.importorskip("imwatermark")
    from microworld.scenes import SceneConfig, generate_scenes
    from pipelines.watermark.keys import parse_key

    bench = _bench()
    key = parse_key(bench.KEY, 48)
    scene = next(iter(generate_scenes(1, seed=77, config=SceneConfig()))).to_pil()
    big = bench.dwt_size(scene)
    assert big.size == (256, 256)
    marked = bench.dwt_embed(big, key)
    assert marked.size == big.size and marked.tobytes() != big.tobytes()
    assert torch.equal(bench.dwt_read(marked, 48), key)
    small = marked.resize((128, 128))  # too small for dwtDct: read after resizing back to 256 px, not refused
    assert bench.dwt_read(small, 48).shape == (48,)
