"""DSCLoRA: fine-tune a pretrained SPAN upscaler with ConvLoRA, supervised by the HR image, a frozen teacher and
the spatial affinity of every block's features (distillation-supervised ConvLoRA, NTIRE 2025 Efficient SR).

Only the ConvLoRA factors train (the SConvLB blocks, conv_2 and the upsampler conv); afterwards they are merged
and the result is saved as a plain SPAN file, as fast and as small as the model it started from.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import UserError
from pipelines.span import SPAN

from .checkpoints import latest_checkpoint, load_checkpoint, rng_restore, save_checkpoint
from .conv_lora import ConvLoRA
from .hr_crops import HRCrops
from .events import EventLog
from .loop import StopFlag, TrainResult


@dataclass
class DscLoraConfig:
    hr_folder: str
    out: str
    base: str | None = None  # the student's starting model (default: the shipped SR model)
    teacher: str | None = None  # default: the same model as the base
    official_pth: bool = False  # allow official .pth files for base/teacher
    steps: int = 300
    batch_size: int = 8
    patch: int = 24  # LR patch side; the HR crop is patch × scale
    lr: float = 5e-4
    # The paper does not publish its weights. The affinity term (a mean over HW×HW entries, summed over 6 blocks)
    # is about 100× the pixel L1, so 0.01 puts the three terms on one scale; a teacher far from the user's domain
    # pulls the student back, hence the small teacher weight (measured in bench/sr_benchmark.py).
    lambda_hr: float = 1.0
    lambda_teacher: float = 0.1
    lambda_affinity: float = 0.01  # 0: without the spatial-affinity loss (the ablation)
    rank_block: int = 2
    alpha_block: float = 4.0
    rank_tail: int = 8
    alpha_tail: float = 16.0
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"

    def validate(self) -> "DscLoraConfig":
        if not self.out.endswith(".safetensors"):
            raise UserError("--out must name a .safetensors file")
        if self.steps < 1 or self.batch_size < 1 or self.patch < 8:
            raise UserError("steps and batch size must be ≥ 1 and the patch ≥ 8 pixels")
        if min(self.lambda_hr, self.lambda_teacher, self.lambda_affinity) < 0:
            raise UserError("loss weights must be ≥ 0")
        return self


def attach_conv_lora(network: SPAN, config: DscLoraConfig) -> list[ConvLoRA]:
    """Wrap every block conv (rank_block) and conv_2 and the upsampler conv (rank_tail) of a folded SPAN."""
    if not network.is_folded:
        network.reparameterize()
    network.requires_grad_(False)
    layers = []
    for block in network.blocks:
        for conv in (block.c1_r, block.c2_r, block.c3_r):
            conv.eval_conv = ConvLoRA(conv.eval_conv, config.rank_block, config.alpha_block)
            layers.append(conv.eval_conv)
    network.conv_2.eval_conv = ConvLoRA(network.conv_2.eval_conv, config.rank_tail, config.alpha_tail)
    network.upsampler[0] = ConvLoRA(network.upsampler[0], config.rank_tail, config.alpha_tail)
    return layers + [network.conv_2.eval_conv, network.upsampler[0]]


def merge_conv_lora(network: SPAN) -> SPAN:
    """Merge every ConvLoRA and put the plain convs back: a SPAN of the original layout."""
    for module in network.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, ConvLoRA):
                child.merge()
                setattr(module, name, child.base)  # also right for nn.Sequential's "0", "1", ... children
    return network


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean |A_s − A_t| of the spatial affinity A = F̂ᵀF̂ (HW × HW), F̂ = features normalised over channels."""
    def affinity(f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.flatten(2), dim=1)
        return f.transpose(1, 2) @ f

    return (affinity(student) - affinity(teacher)).abs().mean()


def train_dsclora(config: DscLoraConfig, run_dir: Path, *, resume: bool = False) -> TrainResult:
    from pipelines.devices import pick_device
    from pipelines.upscale import load_sr_model, save_sr_model

    config.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    # A STOP file already here was written while this process started (spawning a job clears it): honoured after the
    # first step, and removed once acted on.
    log, stop = EventLog(run_dir), StopFlag(run_dir)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    student_model = load_sr_model(config.base, device=str(device), allow_pth=config.official_pth)
    teacher = load_sr_model(config.teacher or config.base, device=str(device), allow_pth=config.official_pth).network
    teacher.requires_grad_(False).eval()
    student = student_model.network
    layers = attach_conv_lora(student, config)
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    data = HRCrops(config.hr_folder, student.config.scale, config.patch, config.seed)

    def trainable() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in student.state_dict().items() if ".lora_" in k}

    step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise UserError(f"{run_dir}: no complete checkpoint to resume from")
        state, weights, opt_state = load_checkpoint(ckpt)
        student.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict({**scheduler.state_dict(), **state.scheduler})
        rng_restore(state.rng, {})
        data.restore(state.extra["data"])
        step = state.step
        log.write("resumed", step=step, checkpoint=ckpt.name)
    else:
        for line in data.report.lines():
            log.write("dataset", message=line)
    log.write("start", step=step, total=config.steps, device=str(device),
              trainable_parameters=sum(p.numel() for p in params), method="dsclora")

    def checkpoint() -> None:
        path = save_checkpoint(run_dir / "checkpoints", step=step, epoch=0, batch=0, trainable=trainable(),
                               optimizer=optimizer, scheduler=scheduler, generators={},
                               extra={"data": data.state()})
        log.write("checkpoint", step=step, path=str(path.relative_to(run_dir)))

    losses: list[float] = []
    recent: list[float] = []
    student.train()
    while step < config.steps:
        started = time.perf_counter()
        lr_img, hr_img = (t.to(device) for t in data.batch(config.batch_size))
        out, feats = student(lr_img, return_features=True)
        with torch.no_grad():
            t_out, t_feats = teacher(lr_img, return_features=True)
        loss_hr = F.l1_loss(out, hr_img)
        loss_teacher = F.l1_loss(out, t_out)
        loss_aff = sum(affinity_loss(s, t) for s, t in zip(feats, t_feats)) if config.lambda_affinity else \
            torch.zeros((), device=device)
        loss = config.lambda_hr * loss_hr + config.lambda_teacher * loss_teacher + config.lambda_affinity * loss_aff
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.item())
        recent = (recent + [time.perf_counter() - started])[-20:]
        log.write("step", step=step, total=config.steps, loss=round(loss.item(), 6), l1_hr=round(loss_hr.item(), 6),
                  l1_teacher=round(loss_teacher.item(), 6), affinity=round(loss_aff.item(), 6),
                  lr=scheduler.get_last_lr()[0], eta_s=round((config.steps - step) * sum(recent) / len(recent), 1))
        if stop and step < config.steps:
            checkpoint()
            stop.file.unlink(missing_ok=True)  # acted on; a later --resume must not stop again
            log.write("stopped", step=step)
            return TrainResult("stopped", step, None, losses)
        if step % config.checkpoint_every == 0 and step < config.steps:
            checkpoint()
    checkpoint()
    network = merge_conv_lora(student).eval()
    save_sr_model(network, Path(config.out), {
        "atelier.method": "dsclora", "atelier.settings": json.dumps(asdict(config)),
        "dsclora.base": str(config.base or "shipped default"), "dsclora.steps": str(step)})
    artifact = str(Path(config.out).resolve())
    stop.file.unlink(missing_ok=True)  # a stop asked for while the last step ran
    log.write("done", step=step, artifact=artifact, final_loss=losses[-1] if losses else None)
    return TrainResult("done", step, artifact, losses)
