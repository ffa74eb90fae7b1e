"""Rebuild the shipped CLIP tokenizer files (vocab.json, merges.txt) from open-clip's BPE table.

Why: the Hub is unreachable, yet prompts, trigger words and token indices must match Stable Diffusion's
tokenizer exactly. open-clip's wheel carries the same BPE merge table OpenAI's CLIP uses, so the vocabulary
can be rebuilt offline: 256 byte symbols, the same with ``</w>``, one token per merge, then the two specials.

    pip download --no-deps -d /tmp/oc open-clip-torch
    python assets/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl assets/clip_tokenizer
"""
from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the table


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(bpe_text: str, out: Path) -> None:
    merges = bpe_text.split("\n")[1 : N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "errors": "replace", "add_prefix_space": False}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    with zipfile.ZipFile(args.wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        text = gzip.decompress(zf.read(name)).decode("utf-8")
    build(text, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
