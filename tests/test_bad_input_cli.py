"""Every CLI command against every relevant item of the bad-input corpus (tests/bad_inputs.py).

Each pair is one test. Most run in-process through ``launch.main`` (the code path ``python launch.py`` takes, minus
the interpreter start and the torch import); three run as real subprocesses and must give the same verdict.

A verdict is one of:

- an error: non-zero exit, stderr exactly ONE line ``error: …`` naming the reason (``needle``), no traceback and
  no ``set ATELIER_DEBUG`` fallback (that one means an unexpected exception class reached ``main``: a bug);
- ``ok``: exit 0, no ``error:`` line, and where the input is odd but usable a ``warning:`` line naming it.

Either way every file that existed before the run (the input itself, an output of an earlier good run the command
could have written over) has the same sha256 afterwards, and a refused command writes no new image or adapter.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bad_inputs import DATASET_BAD_FILES, DATASET_GOOD_FILES, BadInput, good_tiny_lora
from conftest import file_hashes

KEY, OTHER_KEY = "0123456789ab", "ba9876543210"
PROGRESS = re.compile(r"^\s*step \d+/\d+\s*$")


# ---------------------------------------------------------------------------------------------------- the table
# Verdicts: "!needle" = refused with a one-line error containing needle; "ok" = works; "ok:needle" = works and
# warns with needle. Needles are lower-cased substrings of the message the user reads.

IMAGES = {  # the same verdict from every image command unless IMAGE_EXCEPTIONS says otherwise
    "zero_byte_png": "!empty file",
    "truncated_png": "!damaged or truncated",
    "truncated_jpeg": "!damaged or truncated",
    "truncated_jpeg_tail": "!damaged or truncated",
    "text_as_png": "!not an image file",
    "random_bytes_jpg": "!not an image file",
    "png_bomb": "!decompression bomb",
    "png_over_limit": "!larger than the limit",  # refused from the declared size, before decoding
    # Valid images in unusual modes must simply work (converted faithfully, not refused, not garbled).
    "cmyk_jpeg": "ok",
    "gray16_png": "ok",
    "rgba_png": "ok",
    "palette_png": "ok",
    "one_bit_png": "ok",
    "tiny_png": "ok",
}
IMAGE_COMMANDS = ("upscale", "judge", "verify", "identify", "robustness")
# A 1×1 image can be upscaled and judged, but 48 bits cannot be read from one pixel: the watermark commands refuse it.
IMAGE_EXCEPTIONS = {(c, "tiny_png"): "!too small" for c in ("verify", "identify", "robustness")}

ADAPTER_COMMANDS = ("gen-lora", "gen-watermark", "sara-info", "sara-merge", "sara-extract", "wm-merge",
                    "wm-verify-adapter", "wm-verify-extractor", "judge-weights", "b4m-combine")
# Files broken below the level of their meaning get the same reason from every command that reads them.
BROKEN_FILES = {
    "adapter_zero_byte": "!empty",
    "adapter_truncated": "!truncated",
    "adapter_header_only": "!truncated",
    "adapter_garbage_header": "!not json",
    "adapter_huge_header_length": "!not a valid .safetensors",
    "adapter_pickle": "!not a valid .safetensors",  # refused from its first 8 bytes: never unpickled
}
# Whole files that are the wrong kind of thing for a command get that command's "wrong kind" message...
WRONG_KIND = {
    "gen-lora": "!not a lora file",
    "gen-watermark": "!not a watermark adapter",
    "sara-info": "!not a sara delta",
    "sara-merge": "!not a sara delta",
    "sara-extract": "!not a sara delta",
    "wm-merge": "!not a watermark adapter",
    "wm-verify-adapter": "!not a watermark adapter",
    "wm-verify-extractor": "!not a watermark extractor",
    "judge-weights": "!not a micro world judge",
    "b4m-combine": "!not a break-for-make file",
}
# ... and these per-(item, command) verdicts where the file is (or claims to be) of the command's own kind, or
# where a reader that needs LoRA keys fails before it can tell the kind.
ADAPTER_SPECIFIC = {
    "adapter_bad_dtype": {"gen-lora": "!cannot be read", "wm-merge": "!cannot be read",
                          "b4m-combine": "!cannot be read"},
    "lora_other_base_kohya": {"gen-lora": "!other shapes"},
    "lora_other_base_diffusers": {"gen-lora": "!other shapes"},
    # Fits the model's layers, made on another base: applied, with a loud warning (the spec's "adapters for another
    # base" rule for LoRAs; only SaRA deltas, whose values are absolute positions, are refused).
    "lora_foreign_fingerprint": {"gen-lora": "ok:another base model"},
    "safetensors_no_lora_keys": {"wm-merge": "!not a lora file", "b4m-combine": "!not a lora file"},
    "lora_unpaired": {"gen-lora": "!incomplete", "wm-merge": "!incomplete", "b4m-combine": "!incomplete"},
    "sara_bad_index": {"gen-lora": "!outside", "sara-info": "!outside", "sara-merge": "!outside",
                       "sara-extract": "!outside", "wm-merge": "!not a lora file", "b4m-combine": "!not a lora file"},
    # Reading it and extracting a LoRA need no model; applying or merging it on another base is refused.
    "sara_other_shapes": {"gen-lora": "!another base model", "sara-info": "ok", "sara-merge": "!another base model",
                          "sara-extract": "ok", "wm-merge": "!not a lora file", "b4m-combine": "!not a lora file"},
    # Verifying with --adapter needs only the key in the metadata, so these verify (and find no watermark).
    "watermark_stray_layers": {"gen-lora": "!is a watermark adapter", "gen-watermark": "!only the vae decoder",
                               "wm-merge": "!only the vae decoder", "wm-verify-adapter": "ok"},
    "watermark_other_vae": {"gen-lora": "!is a watermark adapter", "gen-watermark": "!shape",
                            "wm-merge": "!shape", "wm-verify-adapter": "ok"},
    # A plain LoRA that fits the tiny model: generation needs none of Break-for-Make's metadata.
    "b4m_incomplete_metadata": {"gen-lora": "ok", "b4m-combine": "!metadata is incomplete"},
}
ADAPTERS = ("adapter_zero_byte", "adapter_truncated", "adapter_header_only", "adapter_garbage_header",
            "adapter_huge_header_length", "adapter_pickle", "adapter_bad_dtype", "lora_other_base_kohya",
            "lora_other_base_diffusers", "lora_foreign_fingerprint", "safetensors_no_lora_keys", "lora_unpaired",
            "sara_bad_index", "sara_other_shapes", "watermark_stray_layers", "watermark_other_vae",
            "b4m_incomplete_metadata")

SR_MODELS = {
    "sr_wrong_shapes": "!wrong shape",
    "sr_bad_scale": "!no span scale",
    "sr_empty": "!not a span",
    "sr_zero_byte": "!empty",
    "sr_truncated": "!truncated",
    "sr_pickle": "!not a valid .safetensors",
    "sr_bad_dtype": "!cannot be read",
}
SR_COMMANDS = ("upscale-model", "train-sr-teacher", "train-sr-model")

SPECS = {
    "spec_box_outside": "!outside 0..1",
    "spec_box_inverted": "!x0 must be less than x1",
    "spec_box_zero_area": "!x0 must be less than x1",
    # Overlapping boxes are defined (outputs averaged where boxes meet): the image is made, the user is told.
    "spec_boxes_identical": "ok:same box",
    "spec_boxes_whole_image": "ok:same box",
    "spec_box_nan": "!must be a number",
    "spec_malformed_json": "!not valid json",
    "spec_not_object": "!json object",
    "spec_wrong_types": "!whole number",
    "spec_missing_lora": "!not found",
    "spec_pickle_lora": "!not a valid .safetensors",
    "spec_latin1": "!not utf-8",
}

PROMPTS = {  # the same verdict from generate and compose
    "prompt_2000_tokens": "ok:2000 tokens",  # CLIP reads 75: the rest is cut, and the user is told so
    "prompt_empty": "ok",  # an empty prompt is unconditional generation, a legitimate request
    "prompt_control_unicode": "ok",
    "prompt_invalid_utf8": "!not valid utf-8",
}
PROMPT_COMMANDS = ("gen-prompt", "compose-prompt")

KEYS = {
    "key_not_hex": "!not hexadecimal",
    "key_wrong_length": "!hex digits",
    "key_too_long": "!hex digits",
    "key_empty": "!empty",
    "key_fullwidth_digits": "!not hexadecimal",
}
KEY_COMMANDS = ("verify-key", "identify-key", "robustness-key", "train-key")
KEY_EXCEPTIONS = {("identify-key", "key_empty"): "!no keys"}

# "Bad files … are reported by name and skipped, never crash the run": training goes on and names each one.
# b4m-content reads it twice, as its images and as its auxiliary set (b4m-style runs the same code).
DATASET_COMMANDS = ("train-lora", "train-sara", "train-sr", "train-b4m-content")

FILENAMES = {  # upscale an image saved under that name; the result must land in --out under a safe name
    "name_traversal_posix": "ok",  # ../../x.png is where the user put it; the result is out/x_x4.png
    "name_traversal_windows": "ok",  # a literal name with backslashes on Linux; the result is out/x_x4.png
    "name_absolute": "!not an image file",  # /etc/passwd is read (it is the user's own command) and refused
    "name_unicode": "ok",
    "name_300_chars": "!cannot open",  # longer than a file name may be: no such file can exist
    "name_nul_newline": "!no such file",  # and the message stays one line (the name is shown escaped)
    "name_dots_only": "!no such file",
}


def _cases() -> list[tuple[str, str, str]]:
    cases = [(c, n, IMAGE_EXCEPTIONS.get((c, n), v)) for n, v in IMAGES.items() for c in IMAGE_COMMANDS]
    for name in ADAPTERS:
        for command in ADAPTER_COMMANDS:
            verdict = BROKEN_FILES.get(name) or ADAPTER_SPECIFIC.get(name, {}).get(command) or WRONG_KIND[command]
            cases.append((command, name, verdict))
    cases += [(c, n, v) for n, v in SR_MODELS.items() for c in SR_COMMANDS]
    cases += [("compose", n, v) for n, v in SPECS.items()]
    cases += [(c, n, v) for n, v in PROMPTS.items() for c in PROMPT_COMMANDS]
    cases += [(c, n, KEY_EXCEPTIONS.get((c, n), v)) for n, v in KEYS.items() for c in KEY_COMMANDS]
    cases += [(c, "dataset_mixed", "ok:skipped") for c in DATASET_COMMANDS]
    cases += [("upscale-name", n, v) for n, v in FILENAMES.items()]
    return cases


CASES = _cases()
COMMAND_KINDS = {**{c: "image" for c in IMAGE_COMMANDS}, **{c: "adapter" for c in ADAPTER_COMMANDS},
                 **{c: "sr_model" for c in SR_COMMANDS}, "compose": "spec", **{c: "prompt" for c in PROMPT_COMMANDS},
                 **{c: "key" for c in KEY_COMMANDS}, **{c: "dataset" for c in DATASET_COMMANDS},
                 "upscale-name": "filename"}


# ---------------------------------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    tiny: Path
    image: Path  # a good micro-world PNG
    hr: Path  # a clean folder of good images (for train sr with a bad model)
    prev_png: Path  # the output of an earlier good `generate` run
    prev_adapter: Path  # an earlier good adapter


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, bad_corpus) -> Env:
    import launch
    from microworld.scenes import SceneConfig, generate_scene

    root = tmp_path_factory.mktemp("cli-env")
    image = root / "scene.png"
    generate_scene(5, SceneConfig(size=64)).to_pil().save(image)
    hr = root / "hr"
    hr.mkdir()
    for i in range(2):
        generate_scene(10 + i, SceneConfig(size=64)).to_pil().save(hr / f"{i}.png")
    prev_png = root / "previous.png"
    code = launch.main(["generate", "--prompt", "a red circle", "--out", str(prev_png), "--model", str(tiny_model_dir),
                        "--steps", "1", "--seed", "3"])
    assert code == 0 and prev_png.is_file()
    return Env(tiny=tiny_model_dir, image=image, hr=hr, prev_png=prev_png, prev_adapter=good_tiny_lora(bad_corpus))


def argv_for(command: str, item: BadInput, env: Env, work: Path) -> list[str]:
    """The command line of one pair; outputs go to work/ (out.png, out.safetensors, up/, merged/, run/)."""
    p, v = str(item.path) if item.path else None, item.value
    tiny, image = str(env.tiny), str(env.image)
    png, adapter, run = str(work / "out.png"), str(work / "out.safetensors"), str(work / "run")
    gen = ["generate", "--prompt", "a red circle", "--out", png, "--model", tiny, "--steps", "1", "--seed", "1"]
    table = {
        "upscale": ["upscale", p, "--out", str(work / "up")],
        "judge": ["microworld", "judge", p],
        "verify": ["watermark", "verify", p, "--key", KEY],
        "identify": ["watermark", "identify", p, "--keys", f"{KEY},{OTHER_KEY}"],
        "robustness": ["watermark", "robustness", p, "--key", KEY],
        "gen-lora": [*gen, "--lora", p],
        "gen-watermark": [*gen, "--watermark", p],
        "sara-info": ["sara", "info", p],
        "sara-merge": ["sara", "merge", p, "--out", str(work / "merged"), "--model", tiny],
        "sara-extract": ["sara", "extract", p, "--out", adapter],
        "wm-merge": ["watermark", "merge", p, "--out", str(work / "merged"), "--model", tiny],
        "wm-verify-adapter": ["watermark", "verify", image, "--adapter", p],
        "wm-verify-extractor": ["watermark", "verify", image, "--key", KEY, "--extractor", p],
        "judge-weights": ["microworld", "judge", image, "--weights", p],
        # Both halves from the bad file: the content file is read first, the style file with the same code.
        "b4m-combine": ["train", "b4m-combine", "--content", p, "--style", p, "--data", str(env.hr), "--style-data",
                        str(env.hr), "--out", adapter, "--model", tiny, "--steps", "1", "--run-dir", run],
        "upscale-model": ["upscale", image, "--out", str(work / "up"), "--model", p],
        "train-sr-teacher": ["train", "sr", "--data", str(env.hr), "--out", adapter, "--teacher", p, "--steps", "1",
                             "--patch", "8", "--run-dir", run],
        "train-sr-model": ["train", "sr", "--data", str(env.hr), "--out", adapter, "--model", p, "--steps", "1",
                           "--patch", "8", "--run-dir", run],
        "compose": ["compose", "--spec", p, "--out", png, "--model", tiny],
        "gen-prompt": ["generate", "--prompt", v, "--negative", v, "--out", png, "--model", tiny, "--steps", "1",
                       "--seed", "1"],
        "verify-key": ["watermark", "verify", image, "--key", v],
        "identify-key": ["watermark", "identify", image, "--keys", v],
        "robustness-key": ["watermark", "robustness", image, "--key", v],
        "train-key": ["watermark", "train", "--out", adapter, "--key", v, "--model", tiny, "--steps", "1",
                      "--latents", "2", "--run-dir", run],
        "train-lora": ["train", "lora", "--data", p, "--out", adapter, "--model", tiny, "--steps", "1",
                       "--resolution", "32", "--run-dir", run],
        "train-sara": ["train", "sara", "--data", p, "--out", adapter, "--model", tiny, "--steps", "1",
                       "--resolution", "32", "--run-dir", run],
        "train-sr": ["train", "sr", "--data", p, "--out", adapter, "--steps", "1", "--patch", "8", "--run-dir", run],
        "train-b4m-content": ["train", "b4m-content", "--data", p, "--aux", p, "--out", adapter, "--model", tiny,
                              "--steps", "1", "--resolution", "32", "--run-dir", run],
    }
    if command == "compose-prompt":  # the value as the global, negative and region prompt of a one-concept spec
        spec = work / "spec.json"
        spec.write_text(json.dumps({"prompt": v, "negative_prompt": v, "steps": 1, "seed": 1, "concepts": [
            {"lora": str(env.prev_adapter), "box": [0.1, 0.1, 0.6, 0.6], "prompt": v or "a sks star"}]}))
        return ["compose", "--spec", str(spec), "--out", png, "--model", tiny]
    if command == "upscale-name":
        return ["upscale", str(named_input(item.value, work)), "--out", str(work / "up")]
    return table[command]


def named_input(name: str, work: Path) -> Path:
    """A good image saved under ``name`` inside work/in/a/b (``..`` steps stay inside work), where the OS allows."""
    base = work / "in" / "a" / "b"
    base.mkdir(parents=True, exist_ok=True)
    target = Path(name) if Path(name).is_absolute() else base / name
    if target.is_absolute() and not str(target).startswith(str(work)):
        return target  # /etc/passwd: given as it is, never written
    try:
        if not target.exists():
            Image.new("RGB", (16, 16), (200, 40, 40)).save(target, format="PNG")
    except (OSError, ValueError):  # too long, NUL byte: the OS refuses the name, the command must too
        pass
    return target


def seed_outputs(work: Path, env: Env) -> None:
    """Earlier good results where the command would write: they must come out unchanged from a refused run."""
    shutil.copy(env.prev_png, work / "out.png")
    shutil.copy(env.prev_adapter, work / "out.safetensors")
    (work / "up").mkdir()
    shutil.copy(env.prev_png, work / "up" / "scene_x4.png")


def sha_tree(*roots: Path) -> dict[str, str]:
    """sha256 of each root that is a file and of every file under each root that is a folder, by absolute path."""
    out = {str(r): hashlib.sha256(r.read_bytes()).hexdigest() for r in roots if r.is_file()}
    for root in roots:
        out.update({str(root / name): digest for name, digest in file_hashes(root).items()})
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    import launch

    capsys.readouterr()
    code = launch.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def stderr_lines(err: str) -> list[str]:
    """stderr without progress lines (``step 3/20`` rewritten in place with carriage returns)."""
    return [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS.match(line)]


def check_verdict(verdict: str, code: int, err: str) -> None:
    lines = stderr_lines(err)
    assert "Traceback" not in err and "ATELIER_DEBUG" not in err, err
    if verdict.startswith("!"):
        assert code != 0, f"accepted, expected a refusal ({verdict}); stderr: {err!r}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {lines!r}"
        assert verdict[1:] in lines[0].lower(), f"{verdict[1:]!r} not in {lines[0]!r}"
        assert lines[0].isprintable() and len(lines[0]) < 500, lines[0]
    else:
        assert code == 0, f"refused (exit {code}), expected {verdict}: {err!r}"
        assert not [line for line in lines if line.startswith("error")], lines
        _, _, needle = verdict.partition(":")
        if needle:
            assert any(line.startswith("warning: ") and needle in line.lower() for line in lines), lines


# ---------------------------------------------------------------------------------------------------- the tests


def by_name(corpus: list[BadInput], name: str) -> BadInput:
    return next(item for item in corpus if item.name == name)


def test_table_covers_the_corpus(bad_corpus):
    """Every corpus item meets every command of its kind (a new item without a verdict fails here)."""
    for kind in set(COMMAND_KINDS.values()):
        commands = {c for c, k in COMMAND_KINDS.items() if k == kind}
        for item in (i for i in bad_corpus if i.kind == kind):
            have = {c for c, n, _ in CASES if n == item.name}
            assert have == commands, f"{item.name}: commands {sorted(commands - have)} have no verdict"
    names = {item.name: item.kind for item in bad_corpus}
    assert all(COMMAND_KINDS[c] == names.get(n) for c, n, _ in CASES), "a case names an item of another kind"


@pytest.mark.parametrize("command,name,verdict", CASES, ids=[f"{c}-{n}" for c, n, _ in CASES])
@pytest.mark.usefixtures("fresh_accelerator_state")  # in-process trainings: not the accelerate state of a test before
def test_bad_input(command, name, verdict, bad_corpus, env, tmp_path, capsys):
    item = by_name(bad_corpus, name)
    work = tmp_path / "work"
    work.mkdir()
    seed_outputs(work, env)
    argv = argv_for(command, item, env, work)
    inputs = [item.path] if item.path else []
    before = sha_tree(work, *inputs)
    code, _, err = run_main(argv, capsys)
    check_verdict(verdict, code, err)
    after = sha_tree(work, *inputs)
    changed = [f for f, digest in before.items() if after.get(f) != digest and not _is_rewritten_output(f, verdict)]
    assert not changed, f"altered or deleted: {changed}"
    new = [f for f in set(after) - set(before) if not f.startswith(str(work / "run"))]
    if verdict.startswith("!"):
        # A refused command leaves no new artefact (a run folder may hold the run's config and its error event).
        assert not [f for f in new if f.endswith((".png", ".safetensors", ".json"))], new
        assert not (work / "merged").exists() or not any((work / "merged").iterdir())
    else:
        check_result(command, item, work, new, err)


def _is_rewritten_output(path: str, verdict: str) -> bool:
    """An accepted command may write its own --out file (out.png, out.safetensors); nothing else may change."""
    return not verdict.startswith("!") and Path(path).name in ("out.png", "out.safetensors", "out.json")


def check_result(command: str, item: BadInput, work: Path, new: list[str], err: str) -> None:
    """What an accepted odd input must produce: a faithful upscale, a real image, a trained adapter."""
    if command in ("upscale", "upscale-name"):
        made = [Path(f) for f in new if f.endswith(".png") and Path(f).parent == work / "up"]
        assert len(made) == 1, new  # beside the earlier result, never over it, never outside --out
        assert made[0].name.endswith("_x4.png") and "/" not in made[0].name and "\\" not in made[0].name
        if command == "upscale":
            check_upscale_faithful(item, made[0])
    if command in ("gen-lora", "gen-prompt", "compose", "compose-prompt"):
        pixels = np.asarray(Image.open(work / "out.png").convert("RGB"), dtype=np.float32)
        assert np.isfinite(pixels).all() and pixels.std() > 1.0  # an image, not a NaN-black or flat square
    if command.startswith("train-") or command in ("sara-extract",):
        assert (work / "out.safetensors").stat().st_size > 0
    if command in DATASET_COMMANDS:
        check_dataset_report(work, err)


def check_upscale_faithful(item: BadInput, result: Path) -> None:
    """The ×4 result keeps the source's brightness (a 16-bit PNG once came out pure white) and its alpha."""
    with Image.open(item.path) as im:
        if im.mode.startswith("I;16"):
            reference = np.asarray(im, dtype=np.float64) / 257.0  # independent of the code under test
        else:
            reference = np.asarray(im.convert("L"), dtype=np.float64)
        has_alpha = im.mode in ("RGBA", "LA") or "transparency" in im.info
    with Image.open(result) as out:
        assert abs(np.asarray(out.convert("L"), dtype=np.float64).mean() - reference.mean()) < 12
        if has_alpha:
            assert out.mode == "RGBA" and np.asarray(out.getchannel("A")).min() == 0, "transparency lost"


def check_dataset_report(work: Path, err: str) -> None:
    """Each bad file named once on stderr before training (and in the run's events), the good ones used, the
    orphan caption mentioned. b4m-content reads the folder twice (images, auxiliary set): once per role."""
    warned = [line for line in stderr_lines(err) if line.startswith("warning: ")]
    named = sorted(line.removeprefix("warning: ").removeprefix("prior: ").split()[1].rstrip(":")
                   for line in warned if "skipped " in line)
    roles = 2 if any("prior: " in line for line in warned) else 1
    assert named == sorted(DATASET_BAD_FILES * roles), warned
    assert any("orphan.txt" in line and "without an image" in line for line in warned), warned
    events = [json.loads(line) for line in (work / "run" / "events.jsonl").read_text().splitlines()]
    logged = " ".join(e.get("message", "") for e in events if e["event"] == "dataset")
    assert all(f"skipped {name}" in logged for name in DATASET_BAD_FILES), logged
    assert not any(f"skipped {name}" in logged for name in DATASET_GOOD_FILES), logged


# Three pairs once more as a user runs them: a separate Python, the real argument parsing, the real exit code.
SUBPROCESS_CASES = [("upscale", "png_bomb"), ("gen-lora", "lora_other_base_kohya"), ("compose", "spec_box_inverted")]


@pytest.mark.parametrize("command,name", SUBPROCESS_CASES, ids=[f"{c}-{n}" for c, n in SUBPROCESS_CASES])
def test_subprocess_verdict_matches(command, name, bad_corpus, env, tmp_path, capsys):
    from conftest import run_cli

    item = by_name(bad_corpus, name)
    verdict = next(v for c, n, v in CASES if (c, n) == (command, name))
    results = []
    for where in ("in-process", "subprocess"):
        work = tmp_path / where
        work.mkdir()
        seed_outputs(work, env)
        argv = argv_for(command, item, env, work)
        if where == "in-process":
            code, _, err = run_main(argv, capsys)
        else:
            done = run_cli(*argv)
            code, err = done.returncode, done.stderr
        check_verdict(verdict, code, err)
        # Paths differ between the two work folders; the file names in the messages do not.
        results.append((code, [line.replace(str(work), "WORK") for line in stderr_lines(err)]))
    assert results[0] == results[1]
