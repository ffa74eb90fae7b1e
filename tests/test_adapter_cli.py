"""``launch.py adapter …``: the Library's list, info, import, export, rename and delete on the command line, with the
Library tab's own functions; shipped examples and files outside the folder are never changed."""
from __future__ import annotations

import json
import shutil

from PIL import Image

from bad_inputs import good_tiny_lora
from conftest import run_cli
from core.safetensors_files import add_metadata
from trainers.events import EventLog
from core.run_provenance import CREATED_KEY, RUN_DIR_KEY, STEPS_KEY


def test_the_library_on_the_command_line(tiny_model_dir, bad_corpus, tmp_path):
    env = {"ATELIER_HOME": str(tmp_path / "home")}
    folder = tmp_path / "home" / "adapters"
    source = good_tiny_lora(bad_corpus)

    def cli(*args):
        return run_cli("adapter", *args, env=env)

    done = cli("import", str(source), "--model", str(tiny_model_dir))
    assert done.returncode == 0 and (folder / source.name).is_file(), done.stderr
    listed = json.loads(cli("list", "--json", "--model", str(tiny_model_dir)).stdout)
    names = [row["name"] for row in listed["adapters"]]
    assert source.name in names and any(n.endswith("(example)") for n in names)
    info = json.loads(cli("info", source.name).stdout)
    assert info["type"] == "LoRA" and "atelier.method" in info["metadata"]
    assert info["created_from"] == "file time" and info["run"] == "" and info["thumbnail"] == ""  # no run recorded

    exported = cli("export", source.name, "--format", "kohya", "--model", str(tiny_model_dir))
    assert exported.returncode == 0, exported.stderr
    kohya = folder / "exports" / source.name.replace(".safetensors", "-kohya.safetensors")
    assert kohya.is_file() and exported.stdout.strip() == f"wrote {kohya}"
    assert json.loads(cli("info", str(kohya)).stdout)["metadata"]["atelier.format"] == "kohya"
    listed = json.loads(cli("list", "--json", "--model", str(tiny_model_dir)).stdout)["adapters"]
    row = next(row for row in listed if row["name"] == source.name)  # one entry, both formats
    assert row["formats"] == f"diffusers; kohya → exports/{kohya.name}"
    assert not any(r["name"] == kohya.name for r in listed)

    assert cli("rename", source.name, "mine").returncode == 0  # the exported copy follows
    assert (folder / "mine.safetensors").is_file() and (folder / "exports" / "mine-kohya.safetensors").is_file()
    assert not kohya.exists()
    shutil.copy(source, folder / source.name)
    clash = cli("rename", "mine.safetensors", source.name)
    assert clash.returncode != 0 and "exists already" in clash.stderr and "Traceback" not in clash.stderr
    example = cli("delete", "heart.safetensors (example)", "--yes")
    assert example.returncode != 0 and "shipped examples stay" in example.stderr
    outside = cli("delete", str(source), "--yes")  # a path elsewhere: refused, the file stays
    assert outside.returncode != 0 and source.is_file()
    gone = cli("delete", "mine.safetensors", "--yes")
    assert gone.returncode == 0 and "exports/mine-kohya.safetensors" in gone.stdout
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")) == [source.name]


def test_list_and_info_show_where_an_adapter_came_from(tiny_model_dir, bad_corpus, tmp_path):
    """An adapter a run made: `list` shows its date, method and steps; `info` its run folder and thumbnail too."""
    env = {"ATELIER_HOME": str(tmp_path / "home")}
    folder, run = tmp_path / "home" / "adapters", tmp_path / "home" / "runs" / "20261208-012259-lora-star"
    folder.mkdir(parents=True)
    star = shutil.copy(good_tiny_lora(bad_corpus), folder / "star.safetensors")
    add_metadata(star, {RUN_DIR_KEY: str(run), STEPS_KEY: "40", CREATED_KEY: "2026-12-08T01:22:59",
                        "atelier.settings": json.dumps({"data": "/home/me/datasets/stars", "steps": 40}),
                        "ss_sd_model_name": "micro"})
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(run / "samples" / "step-0000040-000.png")
    EventLog(run).write("sample", step=40, paths=["samples/step-0000040-000.png"], prompts=["a star"])

    text = run_cli("adapter", "list", "--model", str(tiny_model_dir), env=env)
    assert text.returncode == 0, text.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("star.safetensors"))
    assert "2026-12-08 01:22" in line and " lora " in line and "40 steps" in line, line
    rows = json.loads(run_cli("adapter", "list", "--json", "--model", str(tiny_model_dir), env=env).stdout)
    row = next(row for row in rows["adapters"] if row["name"] == "star.safetensors")
    assert (row["created"], row["method"], row["steps"], row["dataset"], row["run"]) == (
        "2026-12-08T01:22:59", "lora", "40", "stars", run.name)

    info = json.loads(run_cli("adapter", "info", "star.safetensors", env=env).stdout)
    assert info["run_dir"] == str(run) and info["run"] == run.name
    assert info["thumbnail"] == str(run / "samples" / "step-0000040-000.png")
    assert (info["created"], info["created_from"], info["steps"]) == ("2026-12-08T01:22:59", "run", "40")
    assert (info["dataset"], info["base_model"], info["triggers"]) == ("stars", "micro", "sks")
