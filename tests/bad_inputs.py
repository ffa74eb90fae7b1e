"""The bad-input corpus: every kind of broken, hostile or odd input a user can hand the studio, made by code.

``build_corpus(root)`` writes the files under ``root`` (nothing is downloaded, nothing but this code is committed)
and returns one :class:`BadInput` per item. The CLI tests (``test_bad_input_cli.py``) and the browser tests feed
each item to every command or page action that reads its kind; the answer must be one readable line, never a
traceback, and nothing saved before may change.

Kinds and what reads them:

- ``image``: upscale, microworld judge, watermark verify/identify/robustness, upload boxes.
- ``adapter``: generate --lora/--watermark, sara info/merge/extract, watermark merge, b4m-combine, the LoRA picker.
- ``sr_model``: upscale --model, train sr --teacher.
- ``spec``: compose --spec (and the Compose tab's load).
- ``prompt``, ``key``, ``filename``: plain values (``value``), no file.
- ``dataset``: a folder of good micro-world images mixed with bad files, for train lora/sara/sr.

Adapters shaped for a model are shaped for the *tiny random* model (``models.tiny_model``: 32-wide attention,
32-dim text features); the micro model (64-wide) refuses them as another architecture.
Pickles are only ever written here (``pickle.dumps`` of plain data), never loaded.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("image", "adapter", "sr_model", "spec", "prompt", "key", "dataset", "filename")

# Layers of the tiny random model (models/tiny_model.py) a concept LoRA can target, with their (out, in) shape.
TINY_CROSS_LAYERS = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                     "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2")
TINY_WIDTH = 32
# An SD 1.x-sized LoRA layer: 320 wide, which neither the tiny (32) nor the micro model (64) has.
SD15_WIDTH, SD15_CROSS = 320, 768
FOREIGN_FINGERPRINT = "0123456789abcdef"


@dataclass(frozen=True)
class BadInput:
    name: str  # stable id, e.g. "truncated_png"
    kind: str  # one of KINDS
    path: Path | None  # the file (or the folder, for "dataset"); None for pure values
    value: str | None  # prompt text / key string / upload file name, for kinds that are values
    why: str  # a short human phrase for the README table


def of_kind(corpus: list[BadInput], *kinds: str) -> list[BadInput]:
    """The items of the given kinds, in corpus order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kind(s) {sorted(unknown)}")
    return [item for item in corpus if item.kind in kinds]


# ------------------------------------------------------------------------------------------------ raw writers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A well-formed PNG (valid signature, CRCs) declaring width×height RGB pixels, with one short IDAT: a few
    hundred bytes on disk that a careless reader would try to inflate to 30 GB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * 4096, 9)  # the first bytes of the zero rows, as a real deflate stream
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _scene(seed: int, size: int = 64) -> tuple[Image.Image, str]:
    """A valid micro-world scene and its caption (what the studio's own datasets hold)."""
    from microworld.scenes import SceneConfig, generate_scene

    scene = generate_scene(seed, SceneConfig(size=size))
    return scene.to_pil(), scene.caption


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tiny_lora(rank: int = 2, seed: int = 0) -> dict:
    """A diffusers-format concept LoRA that fits the tiny random model (attn2 to_k/to_v of two blocks)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in TINY_CROSS_LAYERS:
        for proj in ("to_k", "to_v"):
            state[f"{layer}.{proj}.lora_A.weight"] = torch.randn(rank, TINY_WIDTH, generator=g) * 0.01
            state[f"{layer}.{proj}.lora_B.weight"] = torch.randn(TINY_WIDTH, rank, generator=g) * 0.01
    return state


# ------------------------------------------------------------------------------------------------ the corpus


def _images(root: Path) -> list[BadInput]:
    d = root / "images"
    d.mkdir(parents=True, exist_ok=True)
    scene, _ = _scene(1)
    png, jpeg = _png_bytes(scene), _jpeg_bytes(scene)
    items: list[tuple[str, str, bytes, str]] = [
        ("zero_byte_png", "empty.png", b"", "zero-byte .png"),
        ("truncated_png", "truncated.png", png[: len(png) // 2], "PNG cut off halfway"),
        ("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2], "JPEG cut off halfway"),
        ("truncated_jpeg_tail", "cut_tail.jpg", jpeg[: len(jpeg) * 85 // 100],
         "JPEG missing its last 15 % (passes PIL's verify())"),
        ("text_as_png", "notes.png", b"These are my shopping notes, not a picture.\n" * 20, "text file renamed .png"),
        ("random_bytes_jpg", "noise.jpg", np.random.default_rng(7).bytes(4096), "4 KB of random bytes named .jpg"),
        ("png_bomb", "bomb.png", png_bomb_bytes(), "tiny PNG declaring 100000×100000 px"),
        ("png_over_limit", "large.png", png_bomb_bytes(8000, 8000),
         "PNG declaring 8000×8000 px: over the studio's limit, under PIL's bomb guard"),
    ]
    cmyk = scene.convert("CMYK")
    gray16 = Image.fromarray((np.asarray(scene.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    rgba = scene.convert("RGBA")
    alpha = np.zeros(scene.size[::-1], dtype=np.uint8)
    alpha[:, scene.size[0] // 2:] = 255  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    palette = scene.quantize(colors=16)
    odd: list[tuple[str, str, bytes, str]] = [
        ("cmyk_jpeg", "cmyk.jpg", _jpeg_bytes(cmyk), "CMYK JPEG"),
        ("gray16_png", "gray16.png", _png_bytes(gray16), "16-bit grayscale PNG (I;16)"),
        ("rgba_png", "rgba.png", _png_bytes(rgba), "RGBA PNG, half transparent"),
        ("palette_png", "palette.png", _png_bytes(palette, transparency=0), "palette PNG with a transparent index"),
        ("one_bit_png", "onebit.png", _png_bytes(scene.convert("1")), "1-bit black-and-white PNG"),
        ("tiny_png", "tiny.png", _png_bytes(scene.resize((1, 1))), "1×1 px PNG"),
    ]
    out = []
    for name, filename, data, why in items + odd:
        path = d / filename
        path.write_bytes(data)
        out.append(BadInput(name, "image", path, None, why))
    return out


def _adapters(root: Path) -> list[BadInput]:
    import torch

    d = root / "adapters"
    d.mkdir(parents=True, exist_ok=True)
    good = _save_tensors(d / "_good_tiny_lora.safetensors", _tiny_lora(),
                         {"atelier.method": "lora", "atelier.trigger_words": "sks"})
    whole = good.read_bytes()
    header_len = 8 + struct.unpack("<Q", whole[:8])[0]

    items: list[BadInput] = []

    def raw(name: str, data: bytes, why: str, filename: str | None = None) -> None:
        path = d / (filename or f"{name}.safetensors")
        path.write_bytes(data)
        items.append(BadInput(name, "adapter", path, None, why))

    raw("adapter_zero_byte", b"", "zero-byte .safetensors")
    raw("adapter_truncated", whole[: header_len + (len(whole) - header_len) // 2], ".safetensors cut off halfway")
    raw("adapter_header_only", whole[:header_len], "valid header, tensor data missing")
    raw("adapter_garbage_header", struct.pack("<Q", 64) + b"\xff\xfe{not json at all}" + b"\x00" * 60,
        "header length fine, header bytes not JSON")
    raw("adapter_huge_header_length", struct.pack("<Q", 2**62) + b"{}", "header length field of 2^62 bytes")
    raw("adapter_pickle", pickle.dumps({"state_dict": {"lora_unet_x.lora_down.weight": [0.0] * 8}, "epoch": 3},
                                       protocol=4), "a pickle (.ckpt) renamed .safetensors")
    raw("adapter_bad_dtype", _safetensors_bytes(
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
         {"dtype": "Q9", "shape": [2, TINY_WIDTH], "data_offsets": [0, 8 * TINY_WIDTH]},
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight":
         {"dtype": "Q9", "shape": [TINY_WIDTH, 2], "data_offsets": [8 * TINY_WIDTH, 16 * TINY_WIDTH]}},
        b"\x00" * (16 * TINY_WIDTH)), "LoRA keys with an unknown tensor dtype")

    def tensors(name: str, state: dict, why: str, metadata: dict[str, str] | None = None) -> None:
        items.append(BadInput(name, "adapter", _save_tensors(d / f"{name}.safetensors", state, metadata), None, why))

    foreign_meta = {"atelier.method": "lora", "atelier.base_fingerprint": FOREIGN_FINGERPRINT,
                    "modelspec.title": "sd15-style", "ss_base_model_version": "sd_v1"}
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2"
    kohya = {}
    for proj, width_in in (("to_q", SD15_WIDTH), ("to_k", SD15_CROSS), ("to_v", SD15_CROSS)):
        kohya[f"{stem}_{proj}.lora_down.weight"] = torch.randn(4, width_in) * 0.01
        kohya[f"{stem}_{proj}.lora_up.weight"] = torch.randn(SD15_WIDTH, 4) * 0.01
        kohya[f"{stem}_{proj}.alpha"] = torch.tensor(4.0)
    tensors("lora_other_base_kohya", kohya, "kohya LoRA for SD 1.5 (320/768-wide layers)", foreign_meta)
    peft = {}
    for proj, width_in in (("to_k", SD15_CROSS), ("to_v", SD15_CROSS)):
        peft[f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.{proj}.lora_A.weight"] = \
            torch.randn(4, width_in) * 0.01
        peft[f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.{proj}.lora_B.weight"] = \
            torch.randn(SD15_WIDTH, 4) * 0.01
    tensors("lora_other_base_diffusers", peft, "diffusers LoRA for SD 1.5 (320/768-wide layers)", foreign_meta)
    tensors("lora_foreign_fingerprint", _tiny_lora(seed=1), "LoRA fitting the tiny model, trained on another base",
            {**foreign_meta, "modelspec.title": "from-another-base"})
    tensors("safetensors_no_lora_keys", {"model.weight": torch.randn(4, 4), "model.bias": torch.zeros(4)},
            "valid .safetensors without any LoRA keys")
    tensors("lora_unpaired", {k: v for k, v in _tiny_lora().items() if k.endswith("lora_A.weight")},
            "LoRA with lora_A halves only")
    # Files that claim one of the studio's own methods in their metadata but do not hold what it needs.
    tensors("sara_bad_index", {"unet.conv_in.weight.sara_index": torch.tensor([0, 5, 10**9], dtype=torch.int32),
                               "unet.conv_in.weight.sara_delta": torch.ones(3)},
            "SaRA delta with positions outside its weight",
            {"atelier.method": "sara", "atelier.sara_shapes": json.dumps({"unet.conv_in.weight": [32, 4, 3, 3]})})
    tensors("sara_other_shapes", {"unet.conv_in.weight.sara_index": torch.tensor([0, 1], dtype=torch.int32),
                                  "unet.conv_in.weight.sara_delta": torch.ones(2)},
            "SaRA delta for a 320-wide conv_in (SD 1.5)",
            {"atelier.method": "sara", "atelier.base_fingerprint": FOREIGN_FINGERPRINT,
             "atelier.sara_shapes": json.dumps({"unet.conv_in.weight": [SD15_WIDTH, 4, 3, 3]})})
    tensors("watermark_stray_layers", _tiny_lora(seed=2), "'watermark' adapter whose layers are in the UNet",
            {"atelier.method": "watermark", "atelier.watermark_key": "0123456789ab"})
    tensors("watermark_other_vae", {
        "vae.decoder.up_blocks.0.resnets.0.conv1.lora_A.weight": torch.randn(4, 512, 3, 3) * 0.01,
        "vae.decoder.up_blocks.0.resnets.0.conv1.lora_B.weight": torch.randn(512, 4, 1, 1) * 0.01},
        "watermark adapter for SD 1.5's 512-wide VAE decoder",
        {"atelier.method": "watermark", "atelier.watermark_key": "0123456789ab"})
    tensors("b4m_incomplete_metadata", _tiny_lora(seed=3), "'Break-for-Make' file without its seed and rank",
            {"atelier.method": "b4m"})
    return items


def _sr_models(root: Path) -> list[BadInput]:
    import torch
    from safetensors.torch import load_file

    from pipelines.upscale import default_sr_model_path

    d = root / "sr"
    d.mkdir(parents=True, exist_ok=True)
    state = load_file(str(default_sr_model_path()))
    items: list[BadInput] = []
    wrong = dict(state)
    key = next(k for k in sorted(wrong) if k.startswith("block_1.") and k.endswith(".weight"))
    wrong[key] = torch.zeros(wrong[key].shape[0] + 5, *wrong[key].shape[1:])
    items.append(BadInput("sr_wrong_shapes", "sr_model", _save_tensors(d / "span_wrong_shapes.safetensors", wrong),
                          None, "SPAN keys, one layer with the wrong shape"))
    odd_scale = dict(state)
    up = odd_scale["upsampler.0.weight"]
    odd_scale["upsampler.0.weight"] = torch.zeros(30, *up.shape[1:])
    odd_scale["upsampler.0.bias"] = torch.zeros(30)
    items.append(BadInput("sr_bad_scale", "sr_model", _save_tensors(d / "span_bad_scale.safetensors", odd_scale),
                          None, "SPAN whose upsampler has 30 channels (no scale)"))
    empty = d / "empty_tensors.safetensors"
    empty.write_bytes(_safetensors_bytes({"__metadata__": {"atelier.method": "span"}}))
    items.append(BadInput("sr_empty", "sr_model", empty, None, "valid .safetensors holding no tensors"))
    zero = d / "zero.safetensors"
    zero.write_bytes(b"")
    items.append(BadInput("sr_zero_byte", "sr_model", zero, None, "zero-byte SR model file"))
    whole = default_sr_model_path().read_bytes()
    cut = d / "span_truncated.safetensors"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    items.append(BadInput("sr_truncated", "sr_model", cut, None, "shipped SPAN cut to two thirds"))
    pick = d / "span_pickle.safetensors"
    pick.write_bytes(pickle.dumps({"params": {"conv_1.weight": [0.0] * 4}}, protocol=4))
    items.append(BadInput("sr_pickle", "sr_model", pick, None, "a pickle (.pth) renamed .safetensors"))
    dtype = d / "span_bad_dtype.safetensors"
    dtype.write_bytes(_safetensors_bytes(
        {"conv_1.eval_conv.weight": {"dtype": "Q9", "shape": [26, 3, 3, 3], "data_offsets": [0, 16]},
         "upsampler.0.weight": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, b"\x00" * 20))
    items.append(BadInput("sr_bad_dtype", "sr_model", dtype, None, "SPAN keys with an unknown dtype and wrong sizes"))
    return items


def _specs(root: Path, good_lora: Path, pickle_lora: Path) -> list[BadInput]:
    d = root / "specs"
    d.mkdir(parents=True, exist_ok=True)

    def concept(box, lora: Path | str = good_lora, prompt: str = "a sks star") -> dict:
        return {"lora": str(lora), "box": box, "prompt": prompt, "strength": 1.0}

    def spec(*concepts: dict) -> dict:
        return {"prompt": "a red circle and a blue star", "concepts": list(concepts), "steps": 1, "guidance": 5.0,
                "seed": 1}

    entries: list[tuple[str, str | dict, str]] = [
        ("spec_box_outside", spec(concept([-0.2, 0.1, 0.5, 1.3])), "box outside [0, 1]"),
        ("spec_box_inverted", spec(concept([0.7, 0.1, 0.2, 0.9])), "inverted box (x1 < x0)"),
        ("spec_box_zero_area", spec(concept([0.3, 0.2, 0.3, 0.8])), "zero-area box (x0 = x1)"),
        ("spec_boxes_identical", spec(concept([0.2, 0.2, 0.8, 0.8]), concept([0.2, 0.2, 0.8, 0.8])),
         "two concepts in the same box"),
        ("spec_boxes_whole_image", spec(concept([0.0, 0.0, 1.0, 1.0]), concept([0.0, 0.0, 1.0, 1.0])),
         "two boxes both covering the whole image"),
        ("spec_box_nan", "{\"prompt\": \"x\", \"concepts\": [{\"lora\": \"a.safetensors\", \"box\": [0, 0, NaN, 1],"
                         " \"prompt\": \"sks\"}]}", "box with NaN"),
        ("spec_malformed_json", "{\"prompt\": \"a red circle\", \"concepts\": [ {\"lora\": ", "malformed JSON"),
        ("spec_not_object", "[1, 2, 3]", "JSON list instead of an object"),
        ("spec_wrong_types", {**spec(concept([0.1, 0.1, 0.5, 0.5])), "steps": "many", "seed": 1.5},
         "steps given as text"),
        ("spec_missing_lora", spec(concept([0.1, 0.1, 0.5, 0.9], lora=d / "no-such-lora.safetensors")),
         "references a LoRA file that does not exist"),
        ("spec_pickle_lora", spec(concept([0.1, 0.1, 0.5, 0.9], lora=pickle_lora)),
         "references a pickle renamed .safetensors"),
        ("spec_latin1", None, "not UTF-8 (Latin-1 bytes)"),
    ]
    items = []
    for name, content, why in entries:
        path = d / f"{name}.json"
        if content is None:
            path.write_bytes('{"prompt": "caf\xe9 \xe0 la cr\xe8me", "concepts": []}'.encode("latin-1"))
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content, indent=1), encoding="utf-8")
        items.append(BadInput(name, "spec", path, None, why))
    return items


def _values() -> list[BadInput]:
    long_prompt = " ".join(["a red circle next to a blue square"] * 250)  # ~2000 CLIP tokens
    prompts = [
        ("prompt_2000_tokens", long_prompt, "prompt of ~2000 tokens (limit 75)"),
        ("prompt_empty", "", "empty prompt"),
        ("prompt_control_unicode", "a red\x00 circle\x1b[31m\x07 \u202eevil\u202c 画像 🎨 \u0301\ufeff\r\n\ttab",
         "prompt with NUL, ANSI escapes, bidi marks, emoji"),
        ("prompt_invalid_utf8", "a red circle \udcff\udcfe", "prompt with undecodable bytes (as argv gives them)"),
    ]
    keys = [
        ("key_not_hex", "zz-not-a-key!", "non-hex key"),
        ("key_wrong_length", "abc123", "6 hex digits where 12 are needed"),
        ("key_too_long", "0123456789abcdef" * 4, "64 hex digits where 12 are needed"),
        ("key_empty", "", "empty key"),
        ("key_fullwidth_digits", "０１２３４５６７８９ab", "full-width digits (look like hex, are not)"),
    ]
    names = [
        ("name_traversal_posix", "../../x.png", "upload name ../../x.png"),
        ("name_traversal_windows", "..\\..\\x.png", "upload name ..\\..\\x.png"),
        ("name_absolute", "/etc/passwd", "upload name /etc/passwd"),
        ("name_unicode", "画像 ünïcødé ☃.png", "unicode upload name"),
        ("name_300_chars", "a" * 296 + ".png", "300-character upload name"),
        ("name_nul_newline", "evil\x00name\n.png", "upload name with NUL and newline"),
        ("name_dots_only", "..", "upload name '..'"),
    ]
    return ([BadInput(n, "prompt", None, v, w) for n, v, w in prompts]
            + [BadInput(n, "key", None, v, w) for n, v, w in keys]
            + [BadInput(n, "filename", None, v, w) for n, v, w in names])


def _dataset(root: Path) -> BadInput:
    d = root / "dataset_mixed"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        image, caption = _scene(100 + i)
        image.save(d / f"good_{i}.png")
        (d / f"good_{i}.txt").write_text(caption + "\n", encoding="utf-8")
    image, caption = _scene(200)
    image.save(d / "ünïcødé_画像.png")
    (d / "ünïcødé_画像.txt").write_text(caption + "\n", encoding="utf-8")
    scene_png = _png_bytes(_scene(300)[0])
    (d / "bad_empty.png").write_bytes(b"")
    (d / "bad_truncated.png").write_bytes(scene_png[: len(scene_png) // 2])
    (d / "bad_text.png").write_text("not an image\n" * 10, encoding="utf-8")
    (d / "bad_bomb.png").write_bytes(png_bomb_bytes())
    scene_jpeg = _jpeg_bytes(_scene(301)[0])
    (d / "bad_cut_tail.jpg").write_bytes(scene_jpeg[: len(scene_jpeg) * 85 // 100])
    (d / "bad_empty.txt").write_text("caption of the empty image\n", encoding="utf-8")
    (d / "orphan.txt").write_text("a caption without an image\n", encoding="utf-8")
    return BadInput("dataset_mixed", "dataset", d, None,
                    "4 good images (one unicode-named) + empty, truncated (PNG, JPEG tail), text-as-PNG, PNG-bomb "
                    "files and an orphan caption")


# Files of ``dataset_mixed`` a training run must skip, and those it must use.
DATASET_BAD_FILES = ("bad_bomb.png", "bad_cut_tail.jpg", "bad_empty.png", "bad_text.png", "bad_truncated.png")
DATASET_GOOD_FILES = ("good_0.png", "good_1.png", "good_2.png", "ünïcødé_画像.png")


def build_corpus(root: Path) -> list[BadInput]:
    """Write every file of the corpus under ``root`` and return the items (files first, then values)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = _images(root)
    adapters = _adapters(root)
    good_lora = root / "adapters" / "_good_tiny_lora.safetensors"
    pickle_lora = next(item.path for item in adapters if item.name == "adapter_pickle")
    corpus = images + adapters + _sr_models(root) + _specs(root, good_lora, pickle_lora) + [_dataset(root)] + _values()
    names = [item.name for item in corpus]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return corpus


def good_tiny_lora(corpus: list[BadInput]) -> Path:
    """The valid tiny-model concept LoRA the spec items reference (not itself a bad input)."""
    first = next(item.path for item in corpus if item.kind == "adapter")
    return first.parent / "_good_tiny_lora.safetensors"
