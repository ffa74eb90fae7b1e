"""Train the example concept LoRAs shipped in ``assets/concepts/`` (the Compose tab's demo concepts and the fixtures of
LoRA-Composer's tests and benchmark), with the studio's own LoRA trainer on the micro model.

    python bench/make_concept_loras.py [--out assets/concepts] [--steps 400]

Each is a novel shape the base model never saw, taught from 24 generator scenes with a rare trigger word. The LoRAs
wrap only the cross-attention keys, values and output (``attn2.to_k/to_v/to_out.0``), so LoRA-Composer applies all
of each file (it skips self-attention, feed-forward and conv deltas). About 100 s each on one CPU core.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONCEPTS = {"heart": "zwx", "ring": "qwe"}  # shape → trigger word
TARGETS = ["attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def main() -> int:
    import torch

    from pipelines.microworld.evaluation import novel_shape_set
    from trainers.lora import LoraMethod
    from trainers.loop import TrainConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "assets" / "concepts"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--only", choices=sorted(CONCEPTS), help="train just this concept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="concept-loras-"))
    for shape, trigger in CONCEPTS.items():
        if args.only and shape != args.only:
            continue
        data = novel_shape_set(work / shape, shape, 24)
        started = time.perf_counter()
        config = TrainConfig(data=str(data), out=str(out / f"{shape}.safetensors"), model=str(REPO / "assets" / "micro-sd"),
                             steps=args.steps, batch_size=4, lr=args.lr, trigger=trigger, checkpoint_every=10**6,
                             seed=0, method_options={"rank": args.rank, "targets": TARGETS})
        result = train(config, LoraMethod(), work / f"{shape}-run")
        first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
        print(f"{shape} ({trigger}): {result.status}, loss {first:.4f} -> {last:.4f}, "
              f"{time.perf_counter() - started:.0f} s -> {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
