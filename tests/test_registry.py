"""The registries: adapter types found from their folders, files identified one way everywhere, the command line,
the Train tab and the Library generated from the declarations; a new adapter type is one folder (rsLoRA is the
proof, trained here and checked for its scale)."""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adapters
from adapters.library import describe
from adapters.lora.files import LoraAdapter, LoraLayer, load_lora, save_lora
from adapters.registry import adapter_types, identify, library_columns, read_adapter
from core.errors import UserError
from core.option_fields import cli_args, option_fields
from trainers.registry import train_tab_methods, training_methods

REPO = Path(__file__).resolve().parents[1]


def _lora_file(path: Path, method: str | None, **meta) -> Path:
    layer = LoraLayer(down=torch.randn(2, 8), up=torch.randn(8, 2), alpha=2.0)
    metadata = {"atelier.method": method, **meta} if method else dict(meta)
    return save_lora(LoraAdapter(layers={"unet.mid_block.attentions.0.proj_in": layer}, metadata=metadata), path)


def test_every_adapter_folder_is_found_once():
    kinds = adapter_types()
    assert list(kinds) == ["lora", "rslora", "sara", "plp", "watermark"]
    assert [k.name for k in kinds.values() if k.detect is None] == ["lora"]
    folders = {p.parent.name for p in (REPO / "adapters").glob("*/__init__.py")}
    declared = {p.parent.name for p in (REPO / "adapters").glob("*/__init__.py") if "ADAPTER =" in p.read_text()}
    assert declared == set(kinds) and folders - declared == {"conv_lora"}  # the upscaler's layer: no file type


def test_files_are_identified_by_their_header(tmp_path):
    assert identify(_lora_file(tmp_path / "a.safetensors", None)).name == "lora"  # no metadata: a plain LoRA
    assert identify(_lora_file(tmp_path / "b.safetensors", "b4m")).name == "plp"
    assert identify(_lora_file(tmp_path / "c.safetensors", "watermark")).role == "decoder"
    assert identify(_lora_file(tmp_path / "d.safetensors", "rslora")).name == "rslora"
    assert identify(REPO / "assets" / "concepts" / "heart.safetensors").name == "lora"
    garbage = tmp_path / "e.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert identify(garbage).name == "lora"  # the fallback's reader says what is wrong
    with pytest.raises(UserError):
        read_adapter(garbage)
    assert isinstance(read_adapter(tmp_path / "d.safetensors"), LoraAdapter)


def test_the_command_line_is_generated_from_the_options(tmp_path):
    from launch import build_parser

    parser = build_parser()
    for spec in training_methods().values():
        for f in spec.option_fields():  # every declared option is a flag of `train NAME`
            args = parser.parse_args(["train", spec.name, f.flag] + ([] if f.kind == "bool" else [
                {"int": "3", "float": "0.5", "str": (f.choices or ("x",))[0], "list": "a,b"}[f.kind]]))
            assert getattr(args, f.dest) is not None, (spec.name, f.flag)
    from cli.train import config_from_args

    args = parser.parse_args(["train", "rslora", "--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors"),
                              "--rank", "4", "--train-text-encoder", "--targets", "to_q,to_v"])
    config = config_from_args(args)
    assert config.method == "rslora"
    assert config.method_options == {"rank": 4, "train_text_encoder": True, "targets": ["to_q", "to_v"]}
    args = parser.parse_args(["train", "b4m-content", "--data", "d", "--out", "o.safetensors", "--plp-seed", "7",
                              "--aux-lr-ratio", "0.2", "--preset", "none"])
    assert config_from_args(args).method_options == {"seed": 7, "other_lr_ratio": 0.2}  # flags differ from fields
    with pytest.raises(SystemExit):  # SaRA's budget and threshold exclude each other
        parser.parse_args(["train", "sara", "--budget", "5%", "--threshold", "0.01"])


def test_the_train_tab_queues_what_the_command_line_parses():
    from launch import build_parser

    from cli.train import config_from_args

    parser = build_parser()
    for spec in train_tab_methods():
        values = {f.name: f.form_value() for f in spec.ui_fields()}
        options = spec.from_form({k: v for k, v in values.items() if v not in (None, 0, "")})
        argv = ["train", spec.name, "--data", "d", "--out", "o.safetensors", "--preset", "none",
                *cli_args(spec.option_fields(), options)]
        parsed = config_from_args(parser.parse_args(argv)).method_options
        assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in parsed.items()} == options, spec.name
    assert [s.label for s in train_tab_methods()] == ["LoRA", "rsLoRA", "SaRA"]


def test_library_columns_come_from_the_types(tmp_path):
    titles = [title for title, _ in library_columns()]
    assert titles == ["rank", "alpha", "trained weights", "θ", "stage", "PLP seed", "key bits"]
    entry = describe(_lora_file(tmp_path / "b.safetensors", "b4m", **{"atelier.b4m_stage": "content",
                                                                      "atelier.b4m_seed": "3"}), None)
    assert entry.kind.label == "Break-for-Make (PLP)"
    assert entry.columns["stage"] == "content" and entry.columns["PLP seed"] == "3" and entry.columns["θ"] == ""


NEW_TYPE = '''
"""A made-up LoRA variant, declared as a new folder would declare it."""
from adapters.adapter_type import AdapterType, LibraryColumn
from adapters.lora.config import FORMATS, LoraOptions, lora_peft_config

ADAPTER = AdapterType(
    name="halflora", label="HalfLoRA", summary="a LoRA at half scale", reader="lora", order=9,
    detect=lambda meta: meta.get("atelier.method") == "halflora", composable=True, export_formats=FORMATS,
    columns=(LibraryColumn("half", "atelier.half"),), options=LoraOptions,
    peft_config=lambda options, targets: lora_peft_config(options, targets),
    file_alpha=lambda options: options.effective_alpha / 2, train_tab=True)
'''


def test_a_new_adapter_type_is_one_folder(tmp_path, monkeypatch):
    """A folder dropped next to the others is a `train` command with its options, a Train tab method and a Library
    column, and its files are recognised; nothing else is edited."""
    from launch import build_parser

    folder = tmp_path / "halflora"
    folder.mkdir()
    (folder / "__init__.py").write_text(textwrap.dedent(NEW_TYPE))
    monkeypatch.setattr(adapters, "__path__", [*adapters.__path__, str(tmp_path)])
    adapter_types.cache_clear()
    training_methods.cache_clear()
    try:
        assert "halflora" in adapter_types() and "halflora" in training_methods()
        args = build_parser().parse_args(["train", "halflora", "--rank", "2"])
        assert args.rank == 2 and args.method == "halflora"
        assert "HalfLoRA" in [s.label for s in train_tab_methods()]
        assert "half" in [title for title, _ in library_columns()]
        assert identify(_lora_file(tmp_path / "h.safetensors", "halflora")).label == "HalfLoRA"
    finally:
        monkeypatch.undo()
        sys.modules.pop("adapters.halflora", None)
        adapter_types.cache_clear()
        training_methods.cache_clear()
    assert "halflora" not in adapter_types()


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_rslora_trains_and_its_file_applies_the_trained_scale(data, tiny_model_dir, tmp_path):
    """rsLoRA through the LoRA trainer: peft scales by alpha/√rank; the file stores alpha·√rank so that a plain
    LoRA loader (alpha/rank) applies the same ΔW; the trained adapter lowers the denoising loss."""
    from adapters.lora.apply import merge_lora
    from models.loading import load_model
    from trainers.loop import TrainConfig, train
    from trainers.lora import LoraMethod
    from training_data import fixed_noise_loss

    out = tmp_path / "rs.safetensors"
    config = TrainConfig(data=str(data), out=str(out), model=str(tiny_model_dir), method="rslora", steps=30,
                         batch_size=2, lr=2e-3, seed=3, checkpoint_every=100, method_options={"rank": 4})
    method = LoraMethod("rslora")
    base = load_model(tiny_model_dir).pipe
    before = fixed_noise_loss(base, data, "a red circle", base.unet)
    assert train(config, method, tmp_path / "run").status == "done"
    scalings = {s for m in method.unet.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)
                for s in m.scaling.values()}
    assert scalings == {4 / math.sqrt(4)}  # alpha = rank = 4: scale √4 = 2 (a plain LoRA's would be 1)
    trained = fixed_noise_loss(base, data, "a red circle", method.unet)
    assert trained < 0.9 * before, (before, trained)

    adapter = load_lora(out)
    assert adapter.metadata["atelier.method"] == "rslora" and identify(out).name == "rslora"
    assert float(adapter.metadata["ss_network_alpha"]) == pytest.approx(4 * math.sqrt(4))
    merge_lora(base, load_lora(out, base))  # the file as any LoRA loader reads it
    assert fixed_noise_loss(base, data, "a red circle", base.unet) == pytest.approx(trained, rel=1e-3, abs=1e-5)
