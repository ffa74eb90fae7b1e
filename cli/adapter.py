"""``launch.py adapter list|info|import|export|rename|delete``: the Library tab's work, headless (same functions)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError

# The handlers import the work when they run, so `launch.py --help` stays instant.
MATCH = {True: "this model", False: "another model", None: "unknown"}  # trained on the model given (--model)?


def register(subparsers) -> None:
    parser = subparsers.add_parser("adapter", help="the Library: list, inspect, import, export, rename, delete adapters",
                                   description="The adapters of your data folder (<data folder>/adapters) and the "
                                               "shipped example concepts, as the Library tab shows them.")
    commands = parser.add_subparsers(dest="adapter_command", metavar="COMMAND", required=True)
    ls = commands.add_parser("list", help="every adapter: type, created, method, steps, base model, formats")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--model", help="the base model to check adapters against (default: the embedded model)")
    ls.set_defaults(func=handle_list)
    info = commands.add_parser("info", help="one adapter's details (created, method, steps, dataset, base model, "
                                            "trigger, formats, run folder, thumbnail) and metadata")
    info.add_argument("name", help="a file name of the Library (or a path to any .safetensors adapter)")
    info.set_defaults(func=handle_info)
    imp = commands.add_parser("import", help="check a file and copy it into the Library")
    imp.add_argument("file")
    imp.add_argument("--model", help="the model to read it against (default: the embedded model)")
    imp.set_defaults(func=handle_import)
    exp = commands.add_parser("export", help="write an adapter in another format to <adapters>/exports/")
    exp.add_argument("name")
    exp.add_argument("--format", required=True, choices=("diffusers", "kohya"))
    exp.add_argument("--model", help="the base model (kohya names of SDXL follow its layout; default: embedded)")
    exp.set_defaults(func=handle_export)
    ren = commands.add_parser("rename", help="rename one of your adapters")
    ren.add_argument("name")
    ren.add_argument("new_name")
    ren.set_defaults(func=handle_rename)
    rm = commands.add_parser("delete", help="delete one of your adapters and its exported copies (its run folder "
                                            "stays)")
    rm.add_argument("name")
    rm.add_argument("--yes", action="store_true", help="do not ask")
    rm.set_defaults(func=handle_delete)


def _folder() -> Path:
    from adapters.library import adapters_folder
    from core.paths import data_home

    return adapters_folder(data_home())


def _path(name: str) -> Path:
    from adapters.library import library_path

    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate
    path = library_path(name, _folder())
    if not path.is_file():
        raise UserError(f"{name}: no such adapter in the Library (see `launch.py adapter list`)")
    return path


def _model_pipe(source: str | None):
    """A weightless stand-in where the config files suffice; the loaded model otherwise."""
    from models.loading import load_model, unet_layout

    return unet_layout(source) or load_model(source).pipe


def handle_list(args: argparse.Namespace) -> int:
    from adapters.library import library_entries, library_label
    from models.loading import default_model_source, load_model

    fingerprint = load_model(args.model or str(default_model_source())).fingerprint
    entries, problems = library_entries(_folder(), fingerprint)
    rows = [{"name": library_label(e), "type": e.kind.label, "format": e.format, "formats": e.formats_label(),
             "created": e.created, "method": e.method, "steps": e.steps, "dataset": e.dataset_name,
             "triggers": e.triggers, "base": MATCH[e.matches_model], "base_model": e.base_model, "run": e.run_name,
             "kb": e.size_kb, **e.columns} for e in entries]
    if args.json:
        print(json.dumps({"adapters": rows, "problems": problems}))
        return 0
    for row, entry in zip(rows, entries):
        print(f"{row['name']:40s} {row['type']:22s} {entry.created_label():16s} {row['method']:12s} "
              f"{row['steps'] or '-':>6} steps  {row['base']:14s} {row['kb']:>7} KB  {row['formats']}"
              + (f"  triggers: {row['triggers']}" if row["triggers"] else ""))
    for line in problems:
        print(f"warning: {line}")
    return 0


def handle_info(args: argparse.Namespace) -> int:
    from adapters.library import entry_details, library_entry
    from core.safetensors_files import read_metadata

    path = _path(args.name)
    entry = library_entry(path, _folder())
    print(json.dumps({"file": str(path), "type": entry.kind.label, **entry_details(entry),
                      "metadata": read_metadata(path)}, indent=2))
    return 0


def handle_import(args: argparse.Namespace) -> int:
    from adapters.library import import_adapter

    target = import_adapter(Path(args.file), _folder(), _model_pipe(args.model), original_name=Path(args.file).name)
    print(f"imported {target}")
    return 0


def handle_export(args: argparse.Namespace) -> int:
    from adapters.library import export_adapter

    target = export_adapter(_path(args.name), args.format, _folder(), _model_pipe(args.model))
    print(f"wrote {target}")
    return 0


def handle_rename(args: argparse.Namespace) -> int:
    from adapters.library import rename_adapter

    print(f"renamed to {rename_adapter(args.name, args.new_name, _folder())}")
    return 0


def handle_delete(args: argparse.Namespace) -> int:
    from adapters.library import delete_adapter, exported_copies, library_path

    if not args.yes:
        path = library_path(args.name, _folder())
        also = "".join(f" and {copy}" for copy in (exported_copies(path, _folder()) if path.is_file() else []))
        answer = input(f"delete {args.name}{also} from {_folder()}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    for path in delete_adapter(args.name, _folder()):
        print(f"deleted {path}")
    return 0
