"""A tiny Stable-Diffusion-shaped pipeline with random weights, built from configs.

Why: unit tests (and the studio until the micro model ships) need a real ``StableDiffusionPipeline`` with the same
block types, attention processors and module names as SD 1.x, yet small enough to build and run in well under a
second on a CPU. The tokenizer is the genuine CLIP one shipped in ``assets/clip_tokenizer``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from core.paths import CLIP_TOKENIZER, data_home

TINY_NAME = "tiny-random-sd"


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Random-weight SD-1.x-shaped pipeline: 32 px images, 16×16 latents, cross-attention in every UNet block."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ensure_tiny_model(folder: Path | None = None) -> Path:
    """Create the tiny model as a diffusers folder on first use and return its path (atomic: built aside, renamed)."""
    folder = Path(folder) if folder else data_home() / "models" / TINY_NAME
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _tiny_text_encoder(cls=CLIPTextModel, hidden: int = 32, act: str = "quick_gelu"):
    return cls(CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                              eos_token_id=49407, pad_token_id=49407, projection_dim=hidden, hidden_act=act))


def _tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor)


def build_tiny_sdxl_pipeline(seed: int = 0):
    """Random-weight SDXL-shaped pipeline: two text encoders (the second with a projection, giving the pooled
    embedding), ``text_time`` added conditioning, linear projections and two transformer layers in the deeper block
    (SDXL's ``transformer_layers_per_block``), no attention at the top level; 32 px images."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8,
    )
    vae = _tiny_vae(scaling_factor=0.13025)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=_tiny_text_encoder(act="quick_gelu"),
        text_encoder_2=_tiny_text_encoder(CLIPTextModelWithProjection, act="gelu"), tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER), scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd2_pipeline(seed: int = 0, zero_terminal_snr: bool = False) -> StableDiffusionPipeline:
    """Random-weight SD-2.x-shaped pipeline: v-prediction, linear transformer projections, per-level head sizes;
    ``zero_terminal_snr`` rescales the betas to zero terminal SNR with trailing timesteps (as zsnr fine-tunes do)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, **extra)
    return StableDiffusionPipeline(
        unet=unet, vae=_tiny_vae(), text_encoder=_tiny_text_encoder(act="gelu"),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
