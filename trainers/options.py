"""A run's ``method_options`` (as config.json keeps them) → the method's checked options dataclass."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from core.errors import UserError

T = TypeVar("T")


def parse_options(options_type: type[T], values: Mapping[str, Any], label: str) -> T:
    """Unknown names and bad values are one-line errors; lists (JSON has no tuples) become tuples; then the
    dataclass's own ``validate()`` (every options dataclass has one)."""
    known = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown {label} option(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(options_type)
    converted = {}
    for name, value in values.items():
        kind = hints[name]
        is_tuple = typing.get_origin(kind) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(kind))
        converted[name] = tuple(value) if is_tuple and isinstance(value, list) else value
    try:
        options = options_type(**converted)
    except TypeError as exc:
        raise UserError(f"{label} options: {exc}") from exc
    return options.validate()
