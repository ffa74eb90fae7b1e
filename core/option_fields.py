"""Options declared once, as dataclass fields, and read three ways: as command-line flags, as form fields of the
Train tab and as the command line the tab queues.

An adapter type or a training method lists its options in one frozen dataclass; each field that a user may set carries
:func:`option` metadata (help, flag, label). Nothing else spells the option out again, so a new option is one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "bool", "str", "list")


def option(default: Any, help: str, *, flag: str | None = None, label: str | None = None, ui: bool = False,
           ui_default: Any = None, choices: tuple[str, ...] | None = None, minimum: float | None = None,
           maximum: float | None = None, step: float | None = None, group: str | None = None) -> Any:
    """A dataclass field the user may set. ``flag`` defaults to ``--name-with-dashes``; ``ui`` puts it on the
    Train tab (``ui_default``: what the form shows when the field's default is None); ``group`` names a set of
    mutually exclusive flags."""
    return dataclasses.field(default=default, metadata={
        "option": {"help": help, "flag": flag, "label": label, "ui": ui, "ui_default": ui_default,
                   "choices": choices, "minimum": minimum, "maximum": maximum, "step": step, "group": group}})


@dataclass(frozen=True)
class OptionField:
    name: str  # the dataclass field
    flag: str  # --rank
    kind: str  # one of KINDS
    optional: bool  # None is a valid value (the method then derives one)
    default: Any
    help: str
    label: str
    ui: bool
    ui_default: Any
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    step: float | None
    group: str | None

    @property
    def dest(self) -> str:
        """The argparse attribute (the flag's own spelling: ``--plp-seed`` → ``plp_seed``)."""
        return self.flag.lstrip("-").replace("-", "_")

    def form_value(self) -> Any:
        """What the Train tab shows before the user types."""
        return self.form_value_of(self.default)

    def form_value_of(self, value: Any) -> Any:
        """How the Train tab shows ``value`` (None: the field's ``ui_default``; a list as comma-separated names)."""
        return self.ui_default if value is None else (",".join(value) if self.kind == "list" else value)


def _kind(annotation: Any) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if typing.get_origin(base) in (tuple, list):
        return "list", optional
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    if base not in names:
        raise TypeError(f"option type {annotation!r} is not one of {', '.join(KINDS)}")
    return names[base], optional


def option_fields(options_type: type, names: tuple[str, ...] | None = None) -> list[OptionField]:
    """The user-settable fields of an options dataclass, in declaration order (``names``: only these)."""
    hints = typing.get_type_hints(options_type)
    found = []
    for f in dataclasses.fields(options_type):
        meta = f.metadata.get("option")
        if meta is None or (names is not None and f.name not in names):
            continue
        kind, optional = _kind(hints[f.name])
        found.append(OptionField(
            name=f.name, flag=meta["flag"] or "--" + f.name.replace("_", "-"), kind=kind, optional=optional,
            default=f.default, help=meta["help"], label=meta["label"] or f.name.replace("_", " ").capitalize(),
            ui=meta["ui"], ui_default=meta["ui_default"], choices=meta["choices"], minimum=meta["minimum"],
            maximum=meta["maximum"], step=meta["step"], group=meta["group"]))
    return found


def comma_list(text: str) -> list[str]:
    """A comma-separated list of names, as ``--targets`` takes it."""
    return [t.strip() for t in text.split(",") if t.strip()]


def add_cli_options(parser: argparse.ArgumentParser, fields: list[OptionField]) -> None:
    """One flag per field, every default None (a flag not given leaves a preset's or resumed run's value)."""
    groups: dict[str, Any] = {}
    for f in fields:
        target = parser
        if f.group:
            if f.group not in groups:
                groups[f.group] = parser.add_mutually_exclusive_group()
            target = groups[f.group]
        help_text = f.help.replace("%", "%%")
        if f.kind == "bool":
            target.add_argument(f.flag, dest=f.dest, action="store_true", default=None, help=help_text)
        else:
            convert = {"int": int, "float": float, "str": str, "list": comma_list}[f.kind]
            target.add_argument(f.flag, dest=f.dest, type=convert, choices=f.choices, default=None, help=help_text)


def options_from_args(args: argparse.Namespace, fields: list[OptionField]) -> dict[str, Any]:
    """The fields the command line set, by field name."""
    return {f.name: getattr(args, f.dest) for f in fields if getattr(args, f.dest, None) is not None}


def cli_args(fields: list[OptionField], values: dict[str, Any]) -> list[str]:
    """The flags that set ``values`` (by field name) on a command line; None leaves a field at its default."""
    args: list[str] = []
    for f in fields:
        value = values.get(f.name)
        if value is None:
            continue
        if f.kind == "bool":
            args += [f.flag] if value else []
        elif f.kind == "list":
            args += [f.flag, ",".join(value)]
        elif f.kind == "float":
            args += [f.flag, repr(float(value))]
        else:
            args += [f.flag, str(value)]
    return args


def form_values(fields: list[OptionField], raw: list[Any]) -> dict[str, Any]:
    """Form widget values → field values: blank (and 0 for an optional number) means "not set"; whole numbers are
    checked, so a typo is refused on the page rather than by a job failing in the background."""
    values: dict[str, Any] = {}
    for f, value in zip(fields, raw):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if f.kind in ("int", "float") and f.optional and float(value) == 0:
            continue
        if f.kind == "int":
            if float(value) != int(float(value)):
                raise ValueError(f"{f.label} must be a whole number")
            value = int(float(value))
        elif f.kind == "float":
            value = float(value)
        elif f.kind == "list":
            value = tuple(comma_list(str(value)))
        elif f.kind == "str":
            value = str(value).strip()
        values[f.name] = value
    return values
