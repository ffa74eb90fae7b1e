"""Plain LoRA (peft) on the UNet's attention projections and, on request, on the text encoder(s): the baseline every
other method is compared to, trained the way kohya sd-scripts and diffusers' ``train_dreambooth_lora(_sdxl).py`` do.

The text encoders' LoRA (both encoders on SDXL, the one on SD 1.x/2.x) sits on CLIP's attention projections by
default, as in diffusers' scripts (kohya's default also adapts the MLP: add ``fc1,fc2`` to the text-encoder
targets), and trains at its own learning rate (default: the UNet's, as kohya's ``--text_encoder_lr``).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from adapters.adapter_type import AdapterType
from adapters.lora.config import LoraOptions
from adapters.registry import adapter_type
from trainers.loop import TrainConfig
from trainers.method import TrainingMethod
from trainers.options import parse_options

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LoraMethod(TrainingMethod):
    """Trains every adapter type that peft builds (plain LoRA, rsLoRA, ...): the type gives the options, the peft
    config and the alpha its files store."""

    def __init__(self, adapter: AdapterType | str = "lora") -> None:
        self.adapter_type = adapter_type(adapter) if isinstance(adapter, str) else adapter
        if not self.adapter_type.trainable_with_peft:
            raise ValueError(f"{self.adapter_type.name} is not trained by the LoRA trainer")
        self.name = self.adapter_type.name
        self.unet = None
        self.text_encoders: dict[str, torch.nn.Module] = {}  # component name → encoder carrying a LoRA
        self.options: LoraOptions = self.adapter_type.options()

    def attach(self, pipe, config: TrainConfig) -> list[torch.nn.Parameter]:
        """A LoRA on the UNet (added first, so its random init is what it was before text encoders could train) and,
        with ``train_text_encoder``, on every text encoder; returns the UNet's parameters, then the encoders'."""
        from peft import inject_adapter_in_model

        from core.errors import UserError

        self.options = parse_options(self.adapter_type.options, config.method_options, self.adapter_type.label)
        peft_config = self.adapter_type.peft_config
        self.unet = pipe.unet
        self.unet.add_adapter(peft_config(self.options, self.options.targets))
        self.text_encoders = {}
        if self.options.train_text_encoder:
            for component in TEXT_ENCODERS:
                encoder = getattr(pipe, component, None)
                if not isinstance(encoder, torch.nn.Module):
                    continue
                # peft directly: transformers' own add_adapter wants a newer peft than diffusers' integration does
                try:
                    inject_adapter_in_model(peft_config(self.options, self.options.text_encoder_targets), encoder)
                except ValueError as exc:  # no module matches the targets
                    raise UserError(f"{component}: no layer matches the text-encoder targets "
                                    f"{', '.join(self.options.text_encoder_targets)}") from exc
                if config.gradient_checkpointing:
                    _checkpoint_activations(encoder)
                encoder.train()  # as diffusers' scripts do (CLIP's dropout is 0: only checkpointing cares)
                self.text_encoders[component] = encoder
        return [p for module in self._modules().values() for p in module.parameters() if p.requires_grad]

    def param_groups(self, params: list[torch.nn.Parameter], lr: float) -> list:
        """The text encoders' LoRA at ``text_encoder_lr`` (kohya's per-part rate), the UNet's at ``lr``; a UNet-only
        LoRA keeps one plain parameter list (its optimizer state is what it always was)."""
        text = {id(p) for encoder in self.text_encoders.values() for p in encoder.parameters() if p.requires_grad}
        if not text:
            return list(params)
        return [{"params": [p for p in params if id(p) not in text], "lr": lr},
                {"params": [p for p in params if id(p) in text], "lr": self.options.text_encoder_lr or lr}]

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, **self.text_encoders}

    @staticmethod
    def _state_prefix(component: str) -> str:
        """Checkpoint keys: the UNet's unprefixed (so runs checkpointed before text encoders could train resume)."""
        return "" if component == "unet" else f"{component}."

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = {}
        for component, module in self._modules().items():
            prefix = self._state_prefix(component)
            state.update({prefix + k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        left = dict(state)  # what no text encoder claims is the UNet's (a stray text-encoder key fails its check)
        parts = {}
        for component in self.text_encoders:
            prefix = self._state_prefix(component)
            parts[component] = {k[len(prefix):]: left.pop(k) for k in list(left) if k.startswith(prefix)}
        parts["unet"] = left
        for component, module in self._modules().items():
            expected = set(get_peft_model_state_dict(module))
            given = parts[component]
            if set(given) != expected:
                odd = sorted(set(given) ^ expected)
                raise RuntimeError(f"checkpoint does not match this LoRA ({component}: {odd[:3]})")
            set_peft_model_state_dict(module, given)

    def adapter(self, model, config: TrainConfig):
        """The trained LoRA in the studio's adapter form (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``
        layers), with metadata naming the base model's family, prediction type and resolution."""
        from peft.utils import get_peft_model_state_dict

        from adapters.lora.files import LoraAdapter, LoraLayer, base_model_facts, lora_metadata

        layers: dict[str, LoraLayer] = {}
        alpha = self.adapter_type.file_alpha(self.options)
        for component, module in self._modules().items():
            state = get_peft_model_state_dict(module)
            for key, down in state.items():
                if ".lora_A." not in key:
                    continue
                up = state[key.replace(".lora_A.", ".lora_B.")]
                layers[f"{component}.{key.split('.lora_A.')[0]}"] = LoraLayer(
                    down=down.detach().float().cpu(), up=up.detach().float().cpu(), alpha=alpha)
        triggers = [config.trigger] if config.trigger else []
        settings = {k: v for k, v in asdict(config).items() if k not in ("sample_prompts",)}
        metadata = lora_metadata(method=self.name, base_fingerprint=model.fingerprint, trigger_words=triggers,
                                 rank=self.options.rank, alpha=alpha, settings=settings,
                                 base_model_name=model.name, title=Path(config.out).stem,
                                 **base_model_facts(model.pipe, config.resolution or None))
        return LoraAdapter(layers=layers, metadata=metadata)

    def save_artifact(self, path: Path, model, config: TrainConfig) -> None:
        from adapters.lora.files import save_lora

        save_lora(self.adapter(model, config), path, format=self.options.format, pipe=model.pipe)


def _checkpoint_activations(encoder: torch.nn.Module) -> None:
    """Activation checkpointing of a transformers text encoder, non-reentrant: reentrant checkpointing drops the
    gradients of layers whose input (the frozen embeddings' output) needs none, i.e. the LoRA's."""
    kwargs = {"use_reentrant": False}
    enable = getattr(encoder, "activation_checkpointing_enable", None)  # transformers ≥ 5.x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
