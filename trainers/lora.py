"""Plain LoRA on the UNet's attention projections (peft), the baseline every other method is compared to."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .loop import TrainConfig

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    alpha: float = 0.0  # 0: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def from_config(cls, config: TrainConfig) -> "LoraOptions":
        opts = dict(config.method_options)
        if "targets" in opts:
            opts["targets"] = tuple(opts["targets"])
        return cls(**opts)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha or self.rank)


class LoraMethod:
    name = "lora"

    def __init__(self) -> None:
        self.unet = None
        self.options = LoraOptions()

    def attach(self, pipe, config: TrainConfig) -> list[torch.nn.Parameter]:
        from peft import LoraConfig

        from pipelines.errors import UserError

        self.options = LoraOptions.from_config(config)
        if self.options.rank < 1:
            raise UserError("LoRA rank must be at least 1")
        self.unet = pipe.unet
        self.unet.add_adapter(LoraConfig(r=self.options.rank, lora_alpha=self.options.effective_alpha,
                                         init_lora_weights="gaussian", target_modules=list(self.options.targets)))
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet).items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"checkpoint does not match this LoRA: {unexpected[:3]}")

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def adapter(self, model, config: TrainConfig):
        """The trained LoRA in the studio's adapter form, with its metadata."""
        from pipelines.adapter_files import LoraAdapter, LoraLayer, lora_metadata

        state = self.trainable_state()
        layers: dict[str, LoraLayer] = {}
        for key, down in state.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            up = state[key.replace(".lora_A.", ".lora_B.")]
            layers[f"unet.{module}"] = LoraLayer(down=down.float().cpu(), up=up.float().cpu(),
                                                 alpha=self.options.effective_alpha)
        triggers = [config.trigger] if config.trigger else []
        settings = {k: v for k, v in asdict(config).items() if k not in ("sample_prompts",)}
        metadata = lora_metadata(method="lora", base_fingerprint=model.fingerprint, trigger_words=triggers,
                                 rank=self.options.rank, alpha=self.options.effective_alpha, settings=settings,
                                 base_model_name=model.name, title=Path(config.out).stem)
        return LoraAdapter(layers=layers, metadata=metadata)

    def save_artifact(self, path: Path, model, config: TrainConfig) -> None:
        from pipelines.adapter_files import save_lora

        save_lora(self.adapter(model, config), path, format="diffusers")
