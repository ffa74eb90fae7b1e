"""DSCLoRA: fine-tune a pretrained SPAN upscaler with ConvLoRA, supervised by the HR image, a frozen teacher and
the spatial affinity of every block's features (distillation-supervised ConvLoRA, NTIRE 2025 Efficient SR).

Only the ConvLoRA factors train (the SConvLB blocks, conv_2 and the upsampler conv); afterwards they are merged
and the result is saved as a plain SPAN file, as fast and as small as the model it started from.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import UserError
from models.span import SPAN

from adapters.base import replace_modules, restore_modules
from adapters.conv_lora.layer import ConvLoRA
from trainers.hr_crops import HRCrops
from trainers.dsclora_config import DscLoraConfig
from trainers.run_loop import RunLoop, StepReport, StepTrainer, TrainResult


def attach_conv_lora(network: SPAN, config: DscLoraConfig) -> list[ConvLoRA]:
    """Wrap every block conv (rank_block) and conv_2 and the upsampler conv (rank_tail) of a folded SPAN."""
    if not network.is_folded:
        network.reparameterize()
    network.requires_grad_(False)
    block_convs = [conv.eval_conv for block in network.blocks for conv in (block.c1_r, block.c2_r, block.c3_r)]
    tail_convs = [network.conv_2.eval_conv, network.upsampler[0]]
    settings = {id(conv): (config.rank_block, config.alpha_block) for conv in block_convs}
    settings.update({id(conv): (config.rank_tail, config.alpha_tail) for conv in tail_convs})
    wrapped = replace_modules(network, lambda name, module: id(module) in settings,
                              lambda name, module: ConvLoRA(module, *settings[id(module)]))
    by_conv = {id(layer.base_layer): layer for layer in wrapped.values()}
    return [by_conv[id(conv)] for conv in block_convs + tail_convs]  # blocks, then conv_2, then the upsampler


def merge_conv_lora(network: SPAN) -> SPAN:
    """Merge every ConvLoRA and put the plain convs back: a SPAN of the original layout."""
    return restore_modules(network, merge=True, kind=ConvLoRA)


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean |A_s − A_t| of the spatial affinity A = F̂ᵀF̂ (HW × HW), F̂ = features normalised over channels."""
    def affinity(f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.flatten(2), dim=1)
        return f.transpose(1, 2) @ f

    return (affinity(student) - affinity(teacher)).abs().mean()


HOLD_OUT_EVERY = 8  # every 8th HR image (by name) judges the fine-tune instead of training it


@torch.no_grad()
def crops_psnr(network: SPAN, lr: torch.Tensor, hr: torch.Tensor) -> float:
    """PSNR (dB, RGB in [0, 1]) of the network's ×scale output on fixed crops: the run's quality target."""
    was_training = network.training
    network.eval()
    out = network(lr).clamp(0, 1)
    network.train(was_training)
    mse = F.mse_loss(out.float(), hr.float()).clamp_min(1e-12)
    return float(10 * torch.log10(1.0 / mse))


def train_dsclora(config: DscLoraConfig, run_dir: Path, *, resume: bool = False) -> TrainResult:
    """Fine-tune through the run loop (stop, exact resume, checkpoints, events); merge and save at the end."""
    from models.devices import pick_device
    from pipelines.upscale import load_sr_model, save_sr_model

    config.validate()
    run_dir = Path(run_dir)
    loop = RunLoop(run_dir, total=config.steps, checkpoint_every=config.checkpoint_every, resume=resume)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    loop.phase("loading model")
    student_model = load_sr_model(config.base, device=str(device), allow_pth=config.official_pth)
    teacher = load_sr_model(config.teacher or config.base, device=str(device), allow_pth=config.official_pth).network
    teacher.requires_grad_(False).eval()
    student = student_model.network
    loop.phase("checking data")
    data = HRCrops(config.hr_folder, student.config.scale, config.patch, config.seed, hold_out_every=HOLD_OUT_EVERY)
    if loop.resumed is None:
        for line in data.report.lines():
            loop.log.write("dataset", message=line)
    val_lr, val_hr, held_out = data.validation()
    val_lr, val_hr = val_lr.to(device), val_hr.to(device)
    start_psnr = crops_psnr(student, val_lr, val_hr)  # the start model's, before any ConvLoRA is attached
    layers = attach_conv_lora(student, config)
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    if loop.resumed is not None:
        student.load_state_dict(loop.resumed.trainable, strict=False)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    where = "held-out" if held_out else f"training (fewer than {HOLD_OUT_EVERY} images: none held out)"

    def step(done: int) -> StepReport:
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
        return StepReport(loss.item(), {"l1_hr": round(loss_hr.item(), 6), "l1_teacher": round(loss_teacher.item(), 6),
                                        "affinity": round(loss_aff.item(), 6), "lr": scheduler.get_last_lr()[0]})

    def shortfalls(at: int) -> list[str]:
        trained = crops_psnr(student, val_lr, val_hr)
        loop.log.write("validation", step=at, psnr=None if math.isnan(trained) else round(trained, 3), start_psnr=round(start_psnr, 3),
                       crops=len(val_lr), held_out=held_out)
        if trained >= start_psnr:
            return []
        got = "no number (NaN: training diverged)" if math.isnan(trained) else f"{trained:.2f} dB"
        return [f"PSNR on {len(val_lr)} {where} crops is {got}, below the start model's {start_psnr:.2f} dB: the "
                "fine-tune made the upscaler worse there (try a lower learning rate)"]

    def finish(at: int) -> dict:
        network = merge_conv_lora(student).eval()
        save_sr_model(network, Path(config.out), {
            "atelier.method": "dsclora", "atelier.settings": json.dumps(asdict(config)),
            "dsclora.base": str(config.base or "shipped default"), "dsclora.steps": str(at)})
        return {"artifact": str(Path(config.out).resolve())}

    student.train()
    trainer = StepTrainer(
        step=step, optimizer=optimizer, lr_scheduler=scheduler, finish=finish,
        trainable_state=lambda: {k: v.detach().clone() for k, v in student.state_dict().items() if ".lora_" in k},
        position=lambda: {"data": data.state()}, restore_position=lambda position: data.restore(position["data"]),
        shortfalls=shortfalls)
    return loop.run(trainer, device=str(device), trainable_parameters=sum(p.numel() for p in params),
                    method="dsclora")
