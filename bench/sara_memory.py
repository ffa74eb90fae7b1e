"""SaRA memory benchmark: peak memory and seconds per training step on the SD 1.5 (or SDXL) UNet architecture.

    OMP_NUM_THREADS=1 python bench/sara_memory.py [--arch sd15|sdxl] [--batches 1,4]
                                                  [--methods full,lora,sara,sara_dense] [--budget 50M] [--rank 8]
                                                  [--steps 3] [--resolution 256] [--memory-limit-gib N]

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

``--arch sdxl`` builds SDXL base's UNet instead (2.57e9 parameters, 10.3 GB in fp32; the step also passes SDXL's
added conditioning) and writes bench/results/sara_memory_sdxl.{json,md}. Full fine-tuning of it needs ≈ 41 GB
(weights, gradients and AdamW's two moments), more than a 24 GiB machine has: with ``--memory-limit-gib`` (default 18
for sdxl, none for sd15) the parent polls each child's VmRSS and stops a child above the limit (or when the machine's
available memory runs low), and records the row as "did not fit" instead of letting the kernel swap or kill.
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
OUT_SUFFIX = {"sd15": "", "sdxl": "_sdxl"}  # appended to the output name
METHODS = ("full", "lora", "sara", "sara_dense")
RESULT_PREFIX = "SARA_MEMORY_RESULT "
PHASE_PREFIX = "SARA_MEMORY_PHASE "  # where a child is: what the parent reports if it has to stop it
TEXT_TOKENS = 77
POLL_SECONDS = 0.05  # the memory watch's interval (SDXL children were stopped < 20 MiB past the limit)
MEMORY_FLOOR_GIB = 1.5  # stop a child when the machine's MemAvailable falls below this (other processes use RAM too)
DEFAULT_MEMORY_LIMIT_GIB = {"sd15": None, "sdxl": 18.0}

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
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text embedding + 6 time ids × 256
}
SMALL_SDXL_UNET: dict = {**SDXL_UNET, "block_out_channels": (32, 64, 64), "attention_head_dim": (2, 4, 4),
                         "transformer_layers_per_block": (1, 1, 1), "cross_attention_dim": 64, "norm_num_groups": 8,
                         "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
ARCHITECTURES = {"sd15": (("SD 1.5 UNet", SD15_UNET), ("tiny UNet (--small)", SMALL_UNET)),
                 "sdxl": (("SDXL base UNet", SDXL_UNET), ("tiny SDXL-shaped UNet (--small)", SMALL_SDXL_UNET))}


def unet_config(args: argparse.Namespace) -> tuple[str, dict]:
    """The architecture's name (for the table) and its UNet config."""
    return ARCHITECTURES[args.arch][int(args.small)]


def text_embeds_dim(config: dict) -> int | None:
    """SDXL's pooled text embedding width (the added embedding's input minus the 6 time ids); None for SD 1.5."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


# ------------------------------------------------------------------------------------------- measurement helpers


def max_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_kib(path: str, key: str) -> int | None:
    """A KiB field of a /proc file (``/proc/PID/status`` VmRSS, ``/proc/meminfo`` MemAvailable); None if gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def phase(name: str, **info) -> None:
    """Tell the parent where this child is (the parent names the phase if it has to stop the child)."""
    print(PHASE_PREFIX + json.dumps({"phase": name, **info}), flush=True)


# ------------------------------------------------------------------------------------------- the methods


def attach_method(method: str, unet: torch.nn.Module, budget: str, rank: int) -> tuple[list[torch.nn.Parameter], dict]:
    """Make ``method``'s parameters trainable on ``unet``; returns them and what was attached."""
    from trainers.sara import SaraOptions, masks_for, parse_budget, plan_selection, selectable_weights
    from adapters.sara.layer import wrap_layers

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
    config = unet_config(args)[1]
    torch.manual_seed(args.seed)
    phase("building the model")
    unet = UNet2DConditionModel(**config).to(device).train()  # fp32, as built
    weights = selectable_weights(unet)  # the frozen full-size weights (same tensors after wrapping)
    unet_params = sum(p.numel() for p in unet.parameters())
    phase("attaching the method", unet_params=unet_params)
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
    pooled = text_embeds_dim(config)
    size = float(args.resolution)  # SDXL's time ids: original size, crop top-left, target size (pixels)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch).to(device)
    grads = {"trainable": 0, "frozen": 0, "full_size_weights": 0, "after_zero_grad": 0}
    phase("stepping", unet_params=unet_params, trainable_params=sum(p.numel() for p in params), baseline_kib=baseline)

    def step(name: str) -> float:
        phase(name + ": forward")
        latents = torch.randn((batch, 4, latent, latent), generator=gen).to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        text = torch.randn((batch, TEXT_TOKENS, cross), generator=gen).to(device)
        added = None if pooled is None else {
            "text_embeds": torch.randn((batch, pooled), generator=gen).to(device), "time_ids": time_ids}
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        phase(name + ": backward")
        loss.backward()
        with_grad = [p for p in unet.parameters() if p.grad is not None]
        grads["trainable"] = max(grads["trainable"], sum(id(p) in trainable_ids for p in with_grad))
        grads["frozen"] = max(grads["frozen"], sum(id(p) not in trainable_ids for p in with_grad))
        grads["full_size_weights"] = max(grads["full_size_weights"],
                                         sum(w.grad is not None for w in weights.values()))
        phase(name + ": optimizer step")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grads["after_zero_grad"] = max(grads["after_zero_grad"],
                                       sum(p.grad is not None for p in unet.parameters()))
        return float(loss.detach())

    def timed(name: str) -> tuple[float, float]:
        synchronize(device)
        started = time.perf_counter()
        loss = step(name)
        synchronize(device)
        return time.perf_counter() - started, loss

    warmup, loss = timed("warm-up step")
    print(f"  {method} batch {batch}: warm-up {warmup:.2f} s", file=sys.stderr, flush=True)
    seconds = []
    for i in range(args.steps):
        s, loss = timed(f"timed step {i + 1}")
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


def oom_victim_first() -> None:
    """In a memory-limited child: should the kernel still run out of memory, it kills this child, not a bystander."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def watch(child: subprocess.Popen, limit_gib: float | None) -> dict | None:
    """Wait for ``child``; with a limit, poll its VmRSS and stop it above the limit or when the machine runs low.

    Returns what stopped it (the reason, its last VmRSS and the machine's MemAvailable, KiB), None if it just ended.
    A parent-side watch measures the quantity the table reports (resident memory) and lets the child fail cleanly at
    any allocation; RLIMIT_AS would count address space the child never touches.
    """
    if limit_gib is None:
        child.wait()
        return None
    limit_kib, floor_kib = int(limit_gib * 2**20), int(MEMORY_FLOOR_GIB * 2**20)
    while child.poll() is None:
        rss = proc_kib(f"/proc/{child.pid}/status", "VmRSS") or 0
        available = proc_kib("/proc/meminfo", "MemAvailable")
        reason = ("limit" if rss > limit_kib else
                  "machine" if available is not None and available < floor_kib else None)
        if reason:
            child.kill()
            child.wait()
            return {"reason": reason, "rss_kib": rss, "mem_available_kib": available}
        time.sleep(POLL_SECONDS)
    return None


def run_child(method: str, batch: int, args: argparse.Namespace) -> dict:
    """Measure one (method, batch) in a fresh interpreter; an error record if it fails or is stopped."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(batch),
               "--budget", args.budget, "--rank", str(args.rank), "--steps", str(args.steps),
               "--resolution", str(args.resolution), "--threads", str(args.threads), "--seed", str(args.seed),
               "--arch", args.arch]
    if args.small:
        command.append("--small")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started = time.time()
    limit = args.memory_limit_gib
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out:  # a file: the parent polls instead of reading
        child = subprocess.Popen(command, stdout=out, text=True, env=env, cwd=REPO,
                                 preexec_fn=oom_victim_first if limit is not None else None)
        stopped = watch(child, limit)
        out.seek(0)
        stdout = out.read()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    phases: dict = {}
    for line in stdout.splitlines():
        if line.startswith(PHASE_PREFIX):
            phases.update(json.loads(line[len(PHASE_PREFIX):]))
    if stopped:
        rss, where = mib(stopped["rss_kib"]), phases.get("phase", "starting")
        if stopped["reason"] == "limit":
            row = {"status": "did_not_fit", "error": f"VmRSS {rss} MiB > the {limit:g} GiB ({limit * 1024:,.0f} MiB) "
                                                      f"limit (phase: {where}); stopped by the parent"}
        else:
            row = {"status": "stopped_machine_low", "error": f"the machine's MemAvailable fell below "
                                                             f"{MEMORY_FLOOR_GIB:g} GiB (child VmRSS {rss} MiB, "
                                                             f"phase: {where}); stopped by the parent"}
        # measured or given: the child's peak was above this when it was stopped
        above = limit * 2**20 if stopped["reason"] == "limit" else stopped["rss_kib"]
        row = {"method": method, "batch": batch, **row, "memory_limit_gib": limit, "stopped": stopped,
               "peak_above_kib": above, "phase": phases, "child_seconds": round(time.time() - started, 1),
               "load_avg_1min": round(os.getloadavg()[0], 2)}
        if method == "full" and "unet_params" in phases:
            row["arithmetic_lower_bound_bytes"] = 4 * phases["unet_params"] * 4
            row["arithmetic_lower_bound"] = ("not measured: fp32 weights + gradients + AdamW's exp_avg and "
                                             "exp_avg_sq = 4 × UNet params × 4 bytes, before any activation")
        return row
    if child.returncode or not lines:
        return {"method": method, "batch": batch, "status": "failed", "error": f"child exited with {child.returncode}",
                "phase": phases, "stdout_tail": stdout[-2000:]}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["child_seconds"] = round(time.time() - started, 1)
    result["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other processes slow the steps down
    return result


def add_ratios(rows: list[dict]) -> None:
    """Peak, step peak and s/step of every row divided by LoRA's and full fine-tuning's at the same batch size.

    Where full fine-tuning was stopped, its peak is above the limit (or the VmRSS it was stopped at), so a row's peak
    ÷ that bounds the ratio from above (``vs_full_upper_bound``); nothing else about it is known.
    """
    by_key = {(r["method"], r["batch"]): r for r in rows if "error" not in r}
    unfit = {r["batch"]: r for r in rows if r["method"] == "full" and "peak_above_kib" in r}
    for row in by_key.values():
        for ref in ("lora", "full"):
            other = by_key.get((ref, row["batch"]))
            row[f"vs_{ref}"] = None if other is None else {
                key: (row[key] / other[key] if other[key] > 0 else None)
                for key in ("peak_kib", "step_peak_kib", "seconds_per_step")}
        if row["batch"] in unfit:
            row["vs_full_upper_bound"] = {"peak_kib": row["peak_kib"] / unfit[row["batch"]]["peak_above_kib"]}


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
    bound = (row.get(f"vs_{ref}_upper_bound") or {}).get(key)
    if value is None and bound is not None:
        return f"≤ {bound:.2f}"
    return "–" if value is None else f"{value:.2f}"


def unfit_note(row: dict) -> str:
    """Why a row has no measurement, and for full fine-tuning the arithmetic lower bound (labelled as such)."""
    note = f"{row['method']} b{row['batch']}: {row['error']}."
    if "arithmetic_lower_bound_bytes" in row:
        need = row["arithmetic_lower_bound_bytes"]
        note += (f" Arithmetic lower bound (not measured): fp32 weights + gradients + AdamW's two moments = 4 × "
                 f"{row['phase']['unet_params']:,} params × 4 bytes = {need / 1e9:.3g} GB ({need / 2**30:.3g} GiB), "
                 "before any activation.")
    return note


def load_note(rows: list[dict]) -> str:
    """The machine's 1-min load average as each child ended: above the thread count, others shared the CPUs."""
    loads = [row["load_avg_1min"] for row in rows if "load_avg_1min" in row]
    if not loads:
        return ""
    return f" 1-min load average as each child ended: {min(loads):.1f}–{max(loads):.1f}."


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    rows = result["rows"]
    architecture = s["architecture"] + (f" ({s['unet_params']:,} parameters)" if s.get("unet_params") else "")
    text = f"{TEXT_TOKENS}×{s['cross_attention_dim']} text states"
    if s.get("text_embeds_dim"):
        r = s["resolution"]
        text += (f" and SDXL's added conditioning (text_embeds 1×{s['text_embeds_dim']} random per sample, "
                 f"time_ids [{r}, {r}, 0, 0, {r}, {r}])")
    timing = "1 timed step" if s["steps"] == 1 else f"median of {s['steps']} timed steps"
    limit = s.get("memory_limit_gib")
    lines = [f"# SaRA memory and speed ({result['date']})", "",
             f"{architecture}, random weights, fp32, {s['resolution']} px "
             f"(latents 4×{s['latent']}×{s['latent']}), "
             f"{text}; SaRA budget {s['budget']}, LoRA rank {s['rank']} "
             f"on SaRA's modules; AdamW; {timing} after 1 warm-up; one fresh process per "
             "row" + ("." if limit is None else
                      f", run one at a time under a memory limit of {limit:g} GiB (the parent polled the child's VmRSS "
                      f"every {POLL_SECONDS:g} s and stopped it above the limit, or when the machine's MemAvailable "
                      f"fell below {MEMORY_FLOOR_GIB:g} GiB)."), "",
             f"Machine: {describe_machine(m)}." + load_note(rows), "",
             "| method | batch | trainable params | full-size .grad | peak MiB | step peak MiB | s/step "
             "| peak ÷ LoRA | peak ÷ full | step peak ÷ LoRA | step peak ÷ full | s/step ÷ LoRA "
             "| s/step ÷ full |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "peak_above_kib" in row:
            trainable = row["phase"].get("trainable_params")
            trainable = "–" if trainable is None else f"{trainable:,}"
            above = f"> {mib(row['peak_above_kib'])}"
            peak = (f"did not fit in {row['memory_limit_gib']:g} GiB ({above})" if row["status"] == "did_not_fit"
                    else f"{above} (stopped: the machine ran low)")
            lines.append(f"| {row['method']} | {row['batch']} | {trainable} | – | {peak} |" + " – |" * 8)
            continue
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
              "(expected only for full fine-tuning)."]
    stopped = [row for row in rows if "peak_above_kib" in row]
    if stopped:
        lines += ["", "Not measured:", ""] + [f"- {unfit_note(row)}" for row in stopped]
    if any(row.get("vs_full_upper_bound") for row in rows):
        lines += ["", "≤ x under peak ÷ full: full fine-tuning was stopped, so its peak is above the limit (or, if "
                  "the machine ran low, above the VmRSS it was stopped at); x = the row's measured peak ÷ that is an "
                  "upper bound on the ratio, not a measured ratio."]
    lines += ["", "Checks:", ""] + [f"- {c}" for c in result["checks"]]
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
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd15", help="the UNet architecture")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="stop a child whose VmRSS exceeds this and record 'did not fit' (default: 20 for sdxl, "
                             "none for sd15; 0 = none)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budget = args.budget or ("5%" if args.small else "50M")
    if args.memory_limit_gib is None:
        args.memory_limit_gib = DEFAULT_MEMORY_LIMIT_GIB[args.arch]
    elif args.memory_limit_gib <= 0:
        args.memory_limit_gib = None
    from core.errors import UserError
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
    default = SMALL_OUT if args.small else DEFAULT_OUT
    out = Path(args.out) if args.out else default.with_name(default.name + OUT_SUFFIX[args.arch])
    if args.small and out.resolve().is_relative_to((REPO / "bench" / "results").resolve()):
        raise SystemExit("--small results never go to bench/results; pick another --out")

    rows = []
    for batch in batches:
        for method in methods:
            print(f"{method} batch {batch} …", file=sys.stderr, flush=True)
            rows.append(run_child(method, batch, args))
            if "error" in rows[-1]:
                print(f"  failed: {rows[-1]['error']}\n{rows[-1].get('stdout_tail', '')}", file=sys.stderr, flush=True)
    add_ratios(rows)
    name, config = unet_config(args)
    counted = [r.get("unet_params") or r.get("phase", {}).get("unet_params") for r in rows]
    settings = {"arch": args.arch, "architecture": name, "unet_config": config,
                "unet_params": next((n for n in counted if n), None),
                "resolution": args.resolution, "latent": args.resolution // 8,
                "cross_attention_dim": config["cross_attention_dim"], "batches": batches, "methods": methods,
                "budget": args.budget, "rank": args.rank, "steps": args.steps, "seed": args.seed,
                "optimizer": "torch.optim.AdamW(lr=1e-4)", "memory_limit_gib": args.memory_limit_gib,
                **({} if args.memory_limit_gib is None else
                   {"memory_floor_gib": MEMORY_FLOOR_GIB, "memory_poll_seconds": POLL_SECONDS}),
                **({} if text_embeds_dim(config) is None else
                   {"text_embeds_dim": text_embeds_dim(config),
                    "time_ids": [args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]}),
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
