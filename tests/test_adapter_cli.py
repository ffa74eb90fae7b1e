"""``launch.py adapter …``: the Library's list, info, import, export, rename and delete on the command line, with the
Library tab's own functions; shipped examples and files outside the folder are never changed."""
from __future__ import annotations

import json

from bad_inputs import good_tiny_lora
from conftest import run_cli


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

    exported = cli("export", source.name, "--format", "kohya", "--model", str(tiny_model_dir))
    assert exported.returncode == 0, exported.stderr
    kohya = folder / source.name.replace(".safetensors", ".kohya.safetensors")
    assert kohya.is_file()
    assert json.loads(cli("info", kohya.name).stdout)["metadata"]["atelier.format"] == "kohya"

    assert cli("rename", kohya.name, "mine-kohya").returncode == 0
    assert (folder / "mine-kohya.safetensors").is_file() and not kohya.exists()
    clash = cli("rename", "mine-kohya.safetensors", source.name)
    assert clash.returncode != 0 and "exists already" in clash.stderr and "Traceback" not in clash.stderr
    example = cli("delete", "heart.safetensors (example)", "--yes")
    assert example.returncode != 0 and "shipped examples stay" in example.stderr
    outside = cli("delete", str(source), "--yes")  # a path elsewhere: refused, the file stays
    assert outside.returncode != 0 and source.is_file()
    assert cli("delete", "mine-kohya.safetensors", "--yes").returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == [source.name]
