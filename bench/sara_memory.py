"""SaRA memory benchmark: peak memory and seconds per training step on the SD 1.5 UNet architecture.

    OMP_NUM_THREADS=1 python bench/sara_memory.py [--batches 1,4] [--methods full,lora,sara,sara_dense]
                                                  [--budget 50M] [--rank 8] [--steps 3] [--resolution 256]

Measures one denoising training step (random latents, noise, timesteps and 77-token text states from a seeded
generator; MSE to the noise; backward; AdamW step; zero_grad) of a randomly initialised UNet built from SD 1.5's config
(nothing is downloaded), in fp32 at 256 px (latents 4×32×32), for:

- ``full``: full fine-tuning, every UNet parameter trainable;
- ``lora``: peft LoRA of rank ``--rank`` on exactly the modules SaRA draws from (every Linear/Conv2d of the UNet);
- ``sara``: SaRA with its memory-saving ("sparse") backward, ``--budget`` trainable weights;
- ``sara_dense``: the same SaRA selection through plain autograd (``sparse_backward=False``), the baseline that shows
  what the sparse backward saves.

Every (method, batch) runs in a fresh subprocess (this script with ``--child METHOD BATCH``): peak RSS is a per-process
high-water mark, and the allocator keeps memory a previous model touched, so measurements in one process would
contaminate each other. A child builds the model, attaches the method, records its RSS (the baseline), resets the
kernel's RSS high-water mark, does one warm-up step and ``--steps`` timed ones, and prints JSON; the step peak is the
peak minus the baseline (activations, gradients, optimizer state and transients). On CUDA the numbers come from
``torch.cuda.max_memory_allocated`` instead. ``--small`` swaps in a tiny UNet to check the script in seconds.
Writes bench/results/sara_memory.json and bench/results/sara_memory.md (with ``--small``: under /tmp).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from process_memory import reset_rss_high_water, vm_status  # noqa: E402  (bench/, the script's folder)
from report import describe_machine, machine  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "sara_memory"
SMALL_OUT = Path(tempfile.gettempdir()) / "atelier-bench" / "sara_memory_small"
METHODS = ("full", "lora", "sara", "sara_dense")
RESULT_PREFIX = "SARA_MEMORY_RESULT "
TEXT_TOKENS = 77

# runwayml/stable-diffusion-v1-5, unet/config.json (the architecture only; weights are random).
SD15_UNET: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SMALL_UNET: dict = {**SD15_UNET, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64,
                    "norm_num_groups": 8}


# ------------------------------------------------------------------------------------------- measurement helpers


def max_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- the methods


def attach_method(method: str, unet: torch.nn.Module, budget: str, rank: int) -> tuple[list[torch.nn.Parameter], dict]:
    """Make ``method``'s parameters trainable on ``unet``; returns them and what was attached."""
    from trainers.sara import SaraOptions, masks_for, parse_budget, plan_selection, selectable_weights
    from trainers.sparse_delta_layer import wrap_layers

    if method == "full":
        unet.requires_grad_(True)
        return list(unet.parameters()), {}
    unet.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        names = sorted(selectable_weights(unet))
        pattern = "^(?:" + "|".join(re.escape(name) for name in names) + ")$"  # peft: re.fullmatch on str targets
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern))
        wrapped = {name for name, module in unet.named_modules() if isinstance(module, LoraLayer)}
        if wrapped != set(names):
            raise RuntimeError(f"peft wrapped {len(wrapped)} modules, SaRA's set has {len(names)}: "
                               f"{sorted(wrapped ^ set(names))[:5]} …")
        return [p for p in unet.parameters() if p.requires_grad], {"target_modules": len(names), "rank": rank}
    if method in ("sara", "sara_dense"):
        options = SaraOptions(budget=budget, sparse_backward=method == "sara").validate()
        plan = plan_selection(unet, options)
        masks = masks_for(unet, plan.threshold)
        layers = wrap_layers(unet, masks, sparse_backward=options.sparse_backward)
        del masks  # int64 copies of the indices; the layers keep their own
        return [layer.delta for layer in layers.values()], {
            "budget": budget, "requested": parse_budget(budget, plan.total), "selected": plan.count,
            "of": plan.total, "threshold": plan.threshold, "layers": len(layers),
            "sparse_backward": options.sparse_backward}
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------------------- one child


def measure(method: str, batch: int, args: argparse.Namespace) -> dict:
    """Build the UNet, attach ``method``, train 1 + ``args.steps`` steps at ``batch``; the measurement as a dict."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from trainers.sara import selectable_weights

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = SMALL_UNET if args.small else SD15_UNET
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**config).to(device).train()  # fp32, as built
    weights = selectable_weights(unet)  # the frozen full-size weights (same tensors after wrapping)
    unet_params = sum(p.numel() for p in unet.parameters())
    params, info = attach_method(method, unet, args.budget, args.rank)
    trainable_ids = {id(p) for p in params}
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")

    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        source = "torch.cuda.max_memory_allocated (bytes allocated by tensors, KiB here)"
        baseline = torch.cuda.memory_allocated(device) // 1024
        build_peak = torch.cuda.max_memory_allocated(device) // 1024
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        source = "ru_maxrss after resetting the RSS high-water mark at the baseline (KiB)"
        baseline, build_peak = vm_status("VmRSS"), max_rss_kib()
        # ru_maxrss is what this bench reads: the reset must have brought it down too
        reset = reset_rss_high_water() and max_rss_kib() <= vm_status("VmRSS") + 1024
        if not reset:
            source = "ru_maxrss over the whole process (high-water reset not allowed; may include model building)"

    gen = torch.Generator().manual_seed(args.seed)  # drawn on the CPU: the same data on every device
    latent = args.resolution // 8
    cross = config["cross_attention_dim"]
    grads = {"trainable": 0, "frozen": 0, "full_size_weights": 0, "after_zero_grad": 0}

    def step() -> float:
        latents = torch.randn((batch, 4, latent, latent), generator=gen).to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        text = torch.randn((batch, TEXT_TOKENS, cross), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        with_grad = [p for p in unet.parameters() if p.grad is not None]
        grads["trainable"] = max(grads["trainable"], sum(id(p) in trainable_ids for p in with_grad))
        grads["frozen"] = max(grads["frozen"], sum(id(p) not in trainable_ids for p in with_grad))
        grads["full_size_weights"] = max(grads["full_size_weights"],
                                         sum(w.grad is not None for w in weights.values()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grads["after_zero_grad"] = max(grads["after_zero_grad"],
                                       sum(p.grad is not None for p in unet.parameters()))
        return float(loss.detach())

    def timed() -> tuple[float, float]:
        synchronize(device)
        started = time.perf_counter()
        loss = step()
        synchronize(device)
        return time.perf_counter() - started, loss

    warmup, loss = timed()
    print(f"  {method} batch {batch}: warm-up {warmup:.2f} s", file=sys.stderr, flush=True)
    seconds = []
    for _ in range(args.steps):
        s, loss = timed()
        seconds.append(s)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) // 1024
    else:
        peak = max_rss_kib()

    return {"method": method, "batch": batch, "device": str(device), "dtype": "float32", "memory_source": source,
            "peak_kib": peak, "baseline_kib": baseline, "step_peak_kib": peak - baseline,
            "build_peak_kib": build_peak, "high_water_reset": reset,
            "seconds_per_step": statistics.median(seconds), "step_seconds": [round(s, 4) for s in seconds],
            "warmup_seconds": round(warmup, 4), "trainable_params": sum(p.numel() for p in params),
            "trainable_tensors": len(params),
            "unet_params": unet_params, "grads": grads, "full_size_grad": grads["full_size_weights"] > 0,
            "loss": loss, "info": info}


# ------------------------------------------------------------------------------------------- parent


def run_child(method: str, batch: int, args: argparse.Namespace) -> dict:
    """Measure one (method, batch) in a fresh interpreter; an error record if it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(batch),
               "--budget", args.budget, "--rank", str(args.rank), "--steps", str(args.steps),
               "--resolution", str(args.resolution), "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.small:
        command.append("--small")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started = time.time()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        return {"method": method, "batch": batch, "error": f"child exited with {done.returncode}",
                "stdout_tail": done.stdout[-2000:]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["child_seconds"] = round(time.time() - started, 1)
    return result


def add_ratios(rows: list[dict]) -> None:
    """Peak, step peak and s/step of every row divided by LoRA's and full fine-tuning's at the same batch size."""
    by_key = {(r["method"], r["batch"]): r for r in rows if "error" not in r}
    for row in by_key.values():
        for ref in ("lora", "full"):
            other = by_key.get((ref, row["batch"]))
            row[f"vs_{ref}"] = None if other is None else {
                key: (row[key] / other[key] if other[key] > 0 else None)
                for key in ("peak_kib", "step_peak_kib", "seconds_per_step")}


def checks(rows: list[dict]) -> list[str]:
    """Plausibility statements computed from the rows (each says whether it holds)."""
    out = []
    by_key = {(r["method"], r["batch"]): r for r in rows if "error" not in r}
    for (method, batch), row in by_key.items():
        out.append(f"{method} b{batch}: every trainable tensor got a gradient: "
                   f"{row['grads']['trainable'] == row['trainable_tensors']}")
        if method.startswith("sara"):
            info = row["info"]
            out.append(f"{method} b{batch}: trainable {row['trainable_params']:,} = selected {info['selected']:,} "
                       f"(budget {info['requested']:,}): {row['trainable_params'] == info['selected']}")
        if method != "full":
            out.append(f"{method} b{batch}: no .grad on any frozen weight: {row['grads']['frozen'] == 0}")
        out.append(f"{method} b{batch}: no .grad left after zero_grad: {row['grads']['after_zero_grad'] == 0}")
        dense = by_key.get(("sara_dense", batch))
        if method == "sara" and dense:
            out.append(f"b{batch}: sara_dense step peak ≥ sara step peak: "
                       f"{dense['step_peak_kib'] >= row['step_peak_kib']}")
            same = abs(dense["loss"] - row["loss"]) <= 1e-4 * abs(dense["loss"])
            out.append(f"b{batch}: sara and sara_dense train alike (last loss {row['loss']:.6f} vs "
                       f"{dense['loss']:.6f}): {same}")
    return out


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}" if kib >= 10 * 1024 else f"{kib / 1024:,.1f}"


def ratio(row: dict, ref: str, key: str) -> str:
    value = (row.get(f"vs_{ref}") or {}).get(key)
    return "–" if value is None else f"{value:.2f}"


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    rows = result["rows"]
    lines = [f"# SaRA memory and speed ({result['date']})", "",
             f"{s['architecture']}, random weights, fp32, {s['resolution']} px "
             f"(latents 4×{s['latent']}×{s['latent']}), "
             f"{TEXT_TOKENS}×{s['cross_attention_dim']} text states; SaRA budget {s['budget']}, LoRA rank {s['rank']} "
             f"on SaRA's modules; AdamW; median of {s['steps']} timed steps after 1 warm-up; one fresh process per "
             "row.", "",
             f"Machine: {describe_machine(m)}.", "",
             "| method | batch | trainable params | full-size .grad | peak MiB | step peak MiB | s/step "
             "| peak ÷ LoRA | peak ÷ full | step peak ÷ LoRA | step peak ÷ full | s/step ÷ LoRA "
             "| s/step ÷ full |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['batch']} | failed: {row['error']} |" + " |" * 10)
            continue
        grad = "yes" if row["full_size_grad"] else "no"
        lines.append(f"| {row['method']} | {row['batch']} | {row['trainable_params']:,} | {grad} "
                     f"| {mib(row['peak_kib'])} | {mib(row['step_peak_kib'])} | {row['seconds_per_step']:.3g} "
                     f"| {ratio(row, 'lora', 'peak_kib')} | {ratio(row, 'full', 'peak_kib')} "
                     f"| {ratio(row, 'lora', 'step_peak_kib')} | {ratio(row, 'full', 'step_peak_kib')} "
                     f"| {ratio(row, 'lora', 'seconds_per_step')} | {ratio(row, 'full', 'seconds_per_step')} |")
    sources = sorted({row["memory_source"] for row in rows if "error" not in row})
    lines += ["", "Peak: " + "; ".join(sources) + ". Step peak: peak − the memory right after the model was built "
              "and the method attached (VmRSS on CPU), i.e. activations, gradients, optimizer state and transients of "
              "a training step. Full-size .grad: whether any full-size UNet weight held a gradient after backward "
              "(expected only for full fine-tuning).", "", "Checks:", ""] + [f"- {c}" for c in result["checks"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--budget", default=None, help="SaRA budget (default 50M; 5%% with --small)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (lora_alpha = rank)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--resolution", type=int, default=256, help="image size in pixels (latents are 1/8)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output path without suffix (.json and .md are written)")
    parser.add_argument("--small", action="store_true", help="a tiny UNet config to check the script in seconds")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budget = args.budget or ("5%" if args.small else "50M")
    from pipelines.errors import UserError
    from trainers.sara import parse_budget

    try:
        parse_budget(args.budget, 10**12)
    except UserError as exc:
        parser.error(str(exc))
    if args.resolution % 64:
        parser.error("--resolution must be a multiple of 64 (the UNet downsamples the 1/8 latents three times)")
    if args.steps < 1 or args.rank < 1 or args.threads < 1:
        parser.error("--steps, --rank and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        method, batch = args.child[0], int(args.child[1])
        print(RESULT_PREFIX + json.dumps(measure(method, batch, args)), flush=True)
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    out = Path(args.out) if args.out else (SMALL_OUT if args.small else DEFAULT_OUT)
    if args.small and out.resolve().is_relative_to((REPO / "bench" / "results").resolve()):
        raise SystemExit("--small results never go to bench/results; pick another --out")

    rows = []
    for batch in batches:
        for method in methods:
            print(f"{method} batch {batch} …", file=sys.stderr, flush=True)
            rows.append(run_child(method, batch, args))
            if "error" in rows[-1]:
                print(f"  failed: {rows[-1]['error']}\n{rows[-1]['stdout_tail']}", file=sys.stderr, flush=True)
    add_ratios(rows)
    config = SMALL_UNET if args.small else SD15_UNET
    settings = {"architecture": "tiny UNet (--small)" if args.small else "SD 1.5 UNet", "unet_config": config,
                "resolution": args.resolution, "latent": args.resolution // 8,
                "cross_attention_dim": config["cross_attention_dim"], "batches": batches, "methods": methods,
                "budget": args.budget, "rank": args.rank, "steps": args.steps, "seed": args.seed,
                "optimizer": "torch.optim.AdamW(lr=1e-4)",
                "command": " ".join(["python", "bench/sara_memory.py", *(argv if argv is not None else sys.argv[1:])])}
    result = {"date": time.strftime("%Y-%m-%d"), "settings": settings, "machine": machine(args.threads), "rows": rows,
              "checks": checks(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
