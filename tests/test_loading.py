import json
import pickle
import shutil

import pytest
import torch

from models.devices import pick_attention, pick_dtype, resolve_runtime
from core.errors import ModelLoadError, UserError
from models.fingerprint import pipeline_fingerprint
from models.loading import load_model
from models.tiny_model import build_tiny_pipeline


def test_load_folder(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert model.kind == "folder" and model.native_size == 32
    assert model.runtime.device.type == "cpu" and model.runtime.dtype == torch.float32
    assert model.pipe.unet.dtype == torch.float32


def test_load_from_hub_id_through_the_local_hub_cache(tiny_model_dir, tmp_path, monkeypatch):
    """A Hub id resolves through the standard HF cache; offline, only what is cached loads."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--atelier-test--tiny-sd"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    model = load_model("atelier-test/tiny-sd")
    assert model.kind == "hub"
    assert model.fingerprint == load_model(tiny_model_dir).fingerprint
    with pytest.raises(ModelLoadError, match="not-cached/model"):
        load_model("not-cached/model")


def test_fingerprint_is_stable_and_discriminating(tiny_model_dir, tmp_path):
    a = load_model(tiny_model_dir).fingerprint
    assert a == load_model(tiny_model_dir).fingerprint
    half = tmp_path / "half"
    pipe = build_tiny_pipeline()
    pipe.to(torch.float16).save_pretrained(half)  # same weights stored in fp16
    assert load_model(half).fingerprint == a
    assert pipeline_fingerprint(build_tiny_pipeline(seed=1)) != a
    tuned = build_tiny_pipeline()
    with torch.no_grad():
        tuned.unet.conv_in.weight[0, 0, 0, 0] += 0.5  # one trained weight changes the identity
    assert pipeline_fingerprint(tuned) != a


def test_missing_path_and_wrong_kinds(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(tmp_path / "nope")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(text)
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        load_model(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(ckpt)


def test_truncated_weights_in_a_folder(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(broken)


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    other = tmp_path / "flux"
    shutil.copytree(tiny_model_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"^flux: Flux \(FluxPipeline\) is not supported; Atelier trains"):
        load_model(other)  # refused from model_index.json (tests/test_model_families.py has every refused kind)


def test_runtime_choice_and_overrides():
    rt = resolve_runtime()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert rt.device.type == expected
    assert pick_dtype(torch.device("cuda"), "auto") == torch.float16
    assert pick_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    assert pick_dtype(torch.device("mps"), "auto") == torch.float32
    assert pick_dtype(torch.device("cpu"), "auto") == torch.float32
    assert pick_attention(torch.device("cpu"), "auto") == "sdpa"
    assert resolve_runtime("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(UserError, match="fp16"):
        pick_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(UserError, match="xformers"):
        pick_attention(torch.device("cpu"), "xformers")
    with pytest.raises(UserError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_runtime("cuda")


def test_attention_backend_is_installed(tiny_model_dir):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sdpa = load_model(tiny_model_dir, attention="sdpa")
    assert {type(p) for p in sdpa.pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    eager = load_model(tiny_model_dir, attention="default")
    assert {type(p) for p in eager.pipe.unet.attn_processors.values()} == {AttnProcessor}


def test_bf16_on_cpu_generates(tiny_model_dir):
    from pipelines.generation import GenerationRequest, generate

    model = load_model(tiny_model_dir, dtype="bf16")
    assert model.pipe.unet.dtype == torch.bfloat16
    item = next(generate(model, GenerationRequest("x", steps=2, seed=0)))
    assert item.image.size == (32, 32)


def test_fingerprint_of_tensors_larger_than_float_precision():
    """SD's larger weights have more than 2**24 elements; sampling them must stay in bounds and see the last one."""
    import hashlib

    from models.fingerprint import module_fingerprint

    big = torch.nn.Embedding(5000, 4000)  # 20 M elements
    h1 = hashlib.sha256()
    module_fingerprint(big, h1)
    with torch.no_grad():
        big.weight.view(-1)[-1] += 1.0
    h2 = hashlib.sha256()
    module_fingerprint(big, h2)
    assert h1.hexdigest() != h2.hexdigest()
