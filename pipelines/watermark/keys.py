"""Owner keys: k bits shown to people as hex (4 bits a digit, most significant bit first)."""
from __future__ import annotations

import re
import secrets

import torch

from core.errors import UserError

DEFAULT_BITS = 48
_HEX = re.compile(r"[0-9a-fA-F]+")


def parse_key(text: str, bits: int = DEFAULT_BITS) -> torch.Tensor:
    """A hex key as a float tensor of ``bits`` 0/1 values; a clear message for anything else."""
    if bits % 4:
        raise UserError(f"keys are written in hex, so their length must be a multiple of 4 bits (not {bits})")
    digits = (text or "").strip().lower().removeprefix("0x").replace(" ", "").replace("_", "")
    if not digits:
        raise UserError("the key is empty")
    if not _HEX.fullmatch(digits):
        raise UserError(f"the key {text.strip()[:40]!r} is not hexadecimal (digits 0-9 and a-f only)")
    if len(digits) * 4 != bits:
        raise UserError(f"the key has {len(digits)} hex digits ({len(digits) * 4} bits); this extractor reads "
                        f"{bits} bits ({bits // 4} hex digits)")
    value = int(digits, 16)
    return torch.tensor([(value >> (bits - 1 - i)) & 1 for i in range(bits)], dtype=torch.float32)


def format_key(bits: torch.Tensor) -> str:
    """The hex form of a 0/1 tensor (its length a multiple of 4)."""
    flat = [int(b) for b in bits.flatten().round().tolist()]
    if len(flat) % 4:
        raise ValueError("a key's length must be a multiple of 4 bits")
    value = 0
    for b in flat:
        value = (value << 1) | b
    return f"{value:0{len(flat) // 4}x}"


def new_key(bits: int = DEFAULT_BITS) -> str:
    """A fresh random key (from the OS's secure source) in hex."""
    if bits % 4 or bits < 4:
        raise UserError(f"a key needs a positive multiple of 4 bits (not {bits})")
    return secrets.token_hex(bits // 8 + 1)[: bits // 4]
