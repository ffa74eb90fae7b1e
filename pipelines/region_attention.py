"""Region-aware attention for LoRA-Composer: concept injection in cross-attention, concept isolation in self-attention.

Two small processors on diffusers' attention-processor API share one :class:`RegionState`:

- :class:`RegionCrossAttnProcessor` (every ``attn2``): the global prompt attends as usual; each concept's region
  prompt gets its own keys/values, ``K_n = (W_K + ΔW_Kⁿ)·e_n`` and ``V_n = (W_V + ΔW_Vⁿ)·e_n`` from that concept's
  LoRA deltas, and its output goes through ``W_out + ΔW_outⁿ``. All concepts are computed in one batched attention
  call, and their keys/values are cached across steps (they do not depend on the timestep). Queries inside a box take
  the mean of the concepts covering them; everything else keeps the global output.
- :class:`RegionSelfAttnProcessor` (every ``attn1``): a query inside concept k's box may not attend to keys in
  another concept's box; the background is unrestricted.

No copy of the UNet is made and the base weights are never touched: the LoRA deltas are small factors held here.
Both processors can record the attention maps latent re-initialisation and latent optimisation read.

Everything is per attention module and per resolution, so SDXL's UNet fits as it is: several transformer blocks per
level (``transformer_layers_per_block``) are several ``attn1``/``attn2`` modules, each with its own processor and its
own cached keys/values; levels without attention have no processor; masks are built per token count, whose grid
:func:`grid_of` recovers from the latent size for any aspect ratio; the region prompts' hidden states are whatever
width ``to_k``/``to_v`` take (2048 on SDXL: both text encoders concatenated).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1


def box_masks(boxes: list[Box], height: int, width: int, device=None) -> torch.Tensor:
    """(N, height·width) 0/1 masks of ``boxes`` on a ``height``×``width`` grid; a cell belongs to a box when its
    centre lies inside it, and every box keeps at least the cell under its centre (tiny boxes at coarse layers)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    masks = []
    for x0, y0, x1, y1 in boxes:
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        if not inside.any():
            cy = min(int((y0 + y1) / 2 * height), height - 1)
            cx = min(int((x0 + x1) / 2 * width), width - 1)
            inside[cy, cx] = True
        masks.append(inside.flatten())
    if not masks:
        return torch.zeros(0, height * width, device=device)
    return torch.stack(masks).float()


def isolation_mask(masks: torch.Tensor) -> torch.Tensor:
    """(L, L) boolean "may attend" matrix: False where the query lies in some box and the key in a box the query is
    not in (a pixel in two boxes may attend to both); background queries and keys are unrestricted."""
    member = masks.bool()  # (N, L)
    query_in_box = member.any(0)
    shares_box = (member.float().T @ member.float()) > 0  # (Lq, Lk): some box holds both
    key_in_box = member.any(0)
    forbidden = query_in_box[:, None] & key_in_box[None, :] & ~shares_box
    return ~forbidden


def grid_of(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer with ``tokens`` positions, from the latent size: each UNet level halves both sides,
    rounding up as its stride-2 convolution does (SDXL's 1000×1000 → 125×125, 63×63, 32×32 latents), whatever the
    aspect ratio; levels without attention simply never ask."""
    h, w = latent_hw
    while h * w > tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"an attention layer with {tokens} positions does not fit a {latent_hw} latent")
    return h, w


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
           backend: str) -> torch.Tensor:
    """Attention on (batch, heads, tokens, dim) tensors: xformers when chosen (CUDA), else PyTorch's SDPA."""
    if backend == "xformers" and query.is_cuda:  # pragma: no cover - needs CUDA and xformers
        import xformers.ops as xops  # optional (the `cuda` extra)

        b, h, lq, _ = query.shape
        bias = None
        if allowed is not None:
            lk = allowed.shape[-1]
            # xformers reads an attention bias through storage whose last dimension is a multiple of 8
            bias = query.new_zeros(lq, (lk + 7) // 8 * 8)[:, :lk]
            bias.masked_fill_(~allowed, float("-inf"))
            bias = bias.expand(b * h, lq, lk)
        out = xops.memory_efficient_attention(*(t.reshape(b * h, *t.shape[2:]) for t in (query, key, value)),
                                              attn_bias=bias)
        return out.reshape(b, h, *out.shape[1:])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)


@dataclass
class LowRank:
    """One projection's LoRA delta for all concepts as factors, ``ΔWⁿ = scaleⁿ · upⁿ · downⁿ``, ranks zero-padded to
    the largest so all concepts go through one batched product.

    Why factors, not ΔW: SDXL's dense cross-attention K/V/out deltas weigh about 0.9 GB per concept in fp16 (2048-wide
    keys/values over 70 layers), the factors a few MB. Why the scale apart: alpha/rank · strength folded into fp16
    factors would push small ``up`` values into fp16's subnormal range.
    """
    down: torch.Tensor  # (N, R, in)
    up: torch.Tensor  # (N, out, R)
    scale: torch.Tensor  # (N,) alpha/rank · strength, 0 for a concept without this layer


@dataclass
class ConceptDeltas:
    """One ``attn2`` layer's LoRA deltas for all concepts, strength included; ``None`` where no concept has one."""
    to_k: LowRank | None = None
    to_v: LowRank | None = None
    to_out: LowRank | None = None


@dataclass
class RegionState:
    """What the processors share for one composition: boxes, per-concept text encodings and deltas, switches."""
    boxes: list[Box]
    latent_hw: tuple[int, int]
    concept_embeds: torch.Tensor | None = None  # (N, 2, T, D): [negative, positive] region prompts
    deltas: dict[str, ConceptDeltas] = field(default_factory=dict)  # by attn2 module name
    token_indices: list[list[int]] = field(default_factory=list)  # each concept's trigger tokens in its prompt
    inject: bool = True
    isolate: bool = True
    global_ratio: float = 0.0  # share of the global output kept inside boxes
    backend: str = "sdpa"
    cfg: bool = True  # the UNet batch is [unconditional, conditional] halves
    record: bool = False  # keep attention maps (re-initialisation, latent optimisation)
    record_max_tokens: int = 1024  # self-attention maps only at layers this small (L² memory)
    cross_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (N, L) trigger attention
    self_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (L, L) mean over heads
    _kv_cache: dict = field(default_factory=dict)
    _mask_cache: dict = field(default_factory=dict)

    @property
    def n_concepts(self) -> int:
        return len(self.boxes)

    def masks(self, tokens: int, device) -> tuple[torch.Tensor, tuple[int, int]]:
        key = ("masks", tokens, str(device))
        if key not in self._mask_cache:
            hw = grid_of(tokens, self.latent_hw)
            self._mask_cache[key] = (box_masks(self.boxes, *hw, device=device), hw)
        return self._mask_cache[key]

    def allowed(self, tokens: int, device) -> torch.Tensor:
        key = ("allowed", tokens, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = isolation_mask(self.masks(tokens, device)[0])
        return self._mask_cache[key]

    def embeds_for(self, batch: int) -> torch.Tensor:
        """(N, batch, T, D) region encodings laid out like the UNet batch (negative half first under CFG)."""
        neg, pos = self.concept_embeds[:, 0], self.concept_embeds[:, 1]
        if self.cfg:
            if batch % 2:
                raise ValueError("a classifier-free-guidance batch must have an even size")
            half = batch // 2
            return torch.cat([neg[:, None].expand(-1, half, -1, -1), pos[:, None].expand(-1, half, -1, -1)], 1)
        return pos[:, None].expand(-1, batch, -1, -1)

    def clear_maps(self) -> None:
        self.cross_maps.clear()
        self.self_maps.clear()


def _project(linear: torch.nn.Module, delta: LowRank | None, x: torch.Tensor) -> torch.Tensor:
    """``linear(x) + x·ΔWᵀ`` per concept: x is (N, …, in); ΔW applied as its factors, in x's dtype."""
    out = linear(x)
    if delta is not None:
        low = torch.einsum("n...i,nri->n...r", x, delta.down.to(x.dtype))
        low = low * delta.scale.to(x.dtype).view(-1, *([1] * (low.ndim - 1)))
        out = out + torch.einsum("n...r,nor->n...o", low, delta.up.to(x.dtype))
    return out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·d) → (B, heads, L, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2).flatten(-2)


class _RegionProcessor:
    def __init__(self, state: RegionState, name: str) -> None:
        self.state = state
        self.name = name

    @staticmethod
    def _inputs(attn, hidden_states: torch.Tensor, encoder_hidden_states, temb):
        """What diffusers' SDPA processor does before attention: norms, flattening, heads-split q, k, v."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(context), attn.heads)
        value = _heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        return shape, query, key, value

    def _attend(self, attn, query, key, value, attention_mask, allowed=None) -> torch.Tensor:
        """A caller's own attention mask (SD's UNets pass none) goes to SDPA as given, instead of ``allowed``."""
        if attention_mask is not None:
            batch = query.shape[0]
            mask = attn.prepare_attention_mask(attention_mask, key.shape[-2], batch)
            return F.scaled_dot_product_attention(query, key, value,
                                                  attn_mask=mask.view(batch, attn.heads, -1, mask.shape[-1]))
        return attend(query, key, value, allowed, self.state.backend)

    @staticmethod
    def _output(attn, hidden: torch.Tensor, residual: torch.Tensor, shape) -> torch.Tensor:
        out = hidden
        if shape is not None:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class RegionCrossAttnProcessor(_RegionProcessor):
    """Cross-attention with per-concept keys/values inside each concept's box (LoRA-Composer's concept injection)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        shape, query, key, value = self._inputs(attn, hidden_states, encoder_hidden_states, temb)
        hidden = self._attend(attn, query, key, value, attention_mask)
        out = attn.to_out[1](attn.to_out[0](_merge_heads(hidden).to(query.dtype)))
        if state.inject and state.concept_embeds is not None and encoder_hidden_states is not None:
            out = self._inject(attn, query, out, query.shape[0], query.shape[-2])
        return self._output(attn, out, hidden_states, shape)

    def _concept_kv(self, attn, batch: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        key = (self.name, state.cfg, batch, str(dtype), str(device))
        cached = state._kv_cache.get(key)
        if cached is not None and not torch.is_grad_enabled():
            return cached
        deltas = state.deltas.get(self.name, ConceptDeltas())
        embeds = state.embeds_for(batch).to(device=device, dtype=dtype)  # (N, B, T, D)
        k = _project(attn.to_k, deltas.to_k, embeds)
        v = _project(attn.to_v, deltas.to_v, embeds)
        kv = (k.flatten(0, 1), v.flatten(0, 1))  # (N·B, T, inner)
        if not torch.is_grad_enabled():
            state._kv_cache[key] = kv
        return kv

    def _inject(self, attn, query: torch.Tensor, out_global: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        state = self.state
        n = state.n_concepts
        k, v = self._concept_kv(attn, batch, query.dtype, query.device)
        k, v = _heads(k, attn.heads), _heads(v, attn.heads)
        q = query.repeat(n, 1, 1, 1)  # (N·B, heads, L, d), concept-major like k and v
        hidden = _merge_heads(attend(q, k, v, None, state.backend)).to(query.dtype)  # (N·B, L, inner)
        deltas = state.deltas.get(self.name, ConceptDeltas())
        concept_out = _project(attn.to_out[0], deltas.to_out, hidden.unflatten(0, (n, batch)))  # (N, B, L, out)
        concept_out = attn.to_out[1](concept_out)
        if state.record:
            self._record(q, k, batch)
        masks, _ = state.masks(tokens, query.device)  # (N, L)
        masks = masks.to(query.dtype)
        cover = masks.sum(0)  # (L,)
        inside = torch.einsum("nl,nblo->blo", masks, concept_out) / cover.clamp(min=1)[None, :, None]
        inside = (1 - state.global_ratio) * inside + state.global_ratio * out_global
        return torch.where((cover > 0)[None, :, None], inside, out_global)

    def _record(self, q: torch.Tensor, k: torch.Tensor, batch: int) -> None:
        """Each concept's attention to its trigger tokens over the whole image (conditional half, mean of heads),
        renormalised without the start token as Attend-and-Excite does."""
        state = self.state
        n = state.n_concepts
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (N·B, heads, L, T)
        probs = scores.softmax(-1).unflatten(0, (n, batch))[:, -1].mean(1)  # (N, L, T), conditional image
        probs = probs[..., 1:] / probs[..., 1:].sum(-1, keepdim=True)
        maps = torch.stack([probs[i][:, [t - 1 for t in state.token_indices[i]]].sum(-1) for i in range(n)])
        state.cross_maps[self.name] = maps


class RegionSelfAttnProcessor(_RegionProcessor):
    """Self-attention in which boxes do not look into each other (LoRA-Composer's concept isolation)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        shape, query, key, value = self._inputs(attn, hidden_states, encoder_hidden_states, temb)
        tokens = query.shape[-2]
        allowed = None
        if state.n_concepts and state.isolate and encoder_hidden_states is None and attention_mask is None:
            allowed = state.allowed(tokens, query.device)
        hidden = self._attend(attn, query, key, value, attention_mask, allowed)
        if state.record and state.n_concepts and tokens <= state.record_max_tokens:
            scores = (query[-1:] @ key[-1:].transpose(-1, -2)) * (query.shape[-1] ** -0.5)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            state.self_maps[self.name] = scores.softmax(-1).mean(1)[0]  # (L, L), conditional image
        out = attn.to_out[1](attn.to_out[0](_merge_heads(hidden).to(query.dtype)))
        return self._output(attn, out, hidden_states, shape)


def region_processors(unet, state: RegionState) -> dict[str, object]:
    """A processor for every attention layer of ``unet``: ``attn2`` → injection, everything else → isolation."""
    processors = {}
    for name in unet.attn_processors:
        module = name[: -len(".processor")]
        if module.endswith("attn2"):
            processors[name] = RegionCrossAttnProcessor(state, module)
        else:
            processors[name] = RegionSelfAttnProcessor(state, module)
    return processors
