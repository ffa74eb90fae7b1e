"""Every studio action that reads user input, fed each relevant item of the bad-input corpus (tests/bad_inputs.py):
through Gradio's own client for every item, and through the page in headless Chromium for one upload per tab.

After every case the server still answers, a refusal is one readable line (naming the file or field), and nothing
saved before changed (sha256 of every file in the outputs, adapters, SR-model and dataset folders). At the end of
each test the server log is read: every handler failure must have ended as a ``gr.Error`` (a ``UserError`` shown as
a message), never as an unexpected exception class reaching the page. One studio (the tiny random model) serves the
whole module; its data folder and its TMPDIR are separate folders, as on a real install, so Gradio's path checks
behave as they do for a user.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from bad_inputs import good_tiny_lora, of_kind
from conftest import file_hashes, open_tab, start_studio

pytestmark = pytest.mark.slow

# The image items that are odd but valid (CMYK, 16-bit, alpha, palette, 1-bit, 1×1 px): they must work wherever
# their size allows. Every other image item is broken (empty, cut off, not an image, too large) and refused.
VALID_IMAGES = {"cmyk_jpeg", "gray16_png", "rgba_png", "palette_png", "one_bit_png", "tiny_png"}
# What the Compose tab's "Load composition" answers for each spec: a fragment of the refusal, or None when the file
# only fills the form (overlapping boxes are allowed; a listed pickle is refused when composing, below).
SPEC_REFUSALS = {"spec_box_outside": "outside 0..1", "spec_box_inverted": "x0 must be less than x1",
                 "spec_box_zero_area": "x0 must be less than x1", "spec_box_nan": "must be a number",
                 "spec_malformed_json": "not valid JSON", "spec_not_object": "JSON object",
                 "spec_wrong_types": "steps", "spec_missing_lora": "no-such-lora.safetensors",
                 "spec_latin1": "spec_latin1.json", "spec_boxes_identical": None, "spec_boxes_whole_image": None,
                 "spec_pickle_lora": None}
# Adapters Generate uses despite a flaw, and what its status line says: a LoRA that fits this model's layers but
# names another base model (a warning), and a Break-for-Make file without its seed and rank (only its recombination
# needs them; generation reads it as the plain LoRA it is).
ACCEPTED_ADAPTERS = {"lora_foreign_fingerprint": "another base model", "b4m_incomplete_metadata": "Saved"}
SHIPPED_SR = "Shipped SPAN ×4"
EXTRACTOR = "shipped extractor"
KEY = "3fa9c0d21b7e"
TRIED: Counter = Counter()  # (action, "client" | "page") → cases, for the README table


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raised_errors(log: str) -> list[str]:
    """The exception each failed event ended with: the last line of every outermost traceback in the server log
    (a chained traceback's causes come first, each followed by 'The above exception ...')."""
    lines = log.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        j = i + 1
        while j < len(lines) and lines[j].startswith(" "):
            j += 1
        k = j + 1
        while k < len(lines) and not lines[k].strip():
            k += 1
        if k < len(lines) and lines[k].startswith(("The above exception", "During handling")):
            continue
        found.append(lines[j] if j < len(lines) else "")
    return found


def assert_readable(message: str, *fragments: str) -> None:
    """One line a person can read: not empty, not a bare 'Error', no traceback, and naming what it is about."""
    text = message.strip()
    assert text and text not in ("Error", "None"), message
    assert "\n" not in text and "Traceback" not in text and 'File "' not in text, message
    assert len(text) < 500, message
    for fragment in fragments:
        assert fragment.lower() in text.lower(), (fragment, message)


def test_the_log_check_tells_a_message_from_a_crash():
    """The server-log check below can fail: a UserError shown as a gr.Error passes, a bare exception does not."""
    frame = '  File "/x.py", line 1, in f\n    g()\n'
    shown = (f"Traceback (most recent call last):\n{frame}core.errors.UserError: bad box\n\n"
             "The above exception was the direct cause of the following exception:\n\n"
             f"Traceback (most recent call last):\n{frame}gradio.exceptions.Error: 'bad box'\n")
    crash = f"Traceback (most recent call last):\n{frame}TypeError: int() argument must be a string\n"
    assert raised_errors(shown) == ["gradio.exceptions.Error: 'bad box'"]
    assert raised_errors(shown + "other output\n" + crash)[-1].startswith("TypeError")


@dataclass
class Studio:
    url: str
    home: Path  # its data folder (ATELIER_HOME)
    tmp: Path  # its TMPDIR, outside the data folder
    log: Path
    baseline: np.ndarray  # a fixed-seed image made before any bad input
    log_offset: int = 0
    saved: dict[str, str] = field(default_factory=dict)

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    def client(self) -> Client:
        return Client(self.url, verbose=False)

    def snapshot(self) -> dict[str, str]:
        return {f"{folder}/{name}": digest for folder in ("outputs", "adapters", "sr_models", "datasets")
                for name, digest in file_hashes(self.home / folder).items()}

    def remember(self) -> None:
        """What is saved now is saved work: later cases must not change it."""
        self.saved = self.snapshot()

    def check(self, *, new_ok: tuple[str, ...] = ()) -> None:
        """The server answers, every saved file is byte-identical, and new files appear only under ``new_ok``."""
        with urllib.request.urlopen(self.url, timeout=15) as response:
            assert response.status == 200
        now = self.snapshot()
        changed = sorted(k for k, v in self.saved.items() if now.get(k) != v)
        assert not changed, f"saved files changed or vanished: {changed}"
        new = sorted(k for k in now if k not in self.saved and not k.startswith(new_ok))
        assert not new, f"unexpected new files: {new}"
        self.saved.update(now)

    def unexpected_errors(self) -> list[str]:
        """Handler failures since the last call that were not a gr.Error (a UserError shown as a message)."""
        data = self.log.read_bytes()
        text, self.log_offset = data[self.log_offset:].decode("utf-8", "replace"), len(data)
        return [e for e in raised_errors(text) if not e.startswith("gradio.exceptions.Error")]


def generate_args(prompt: str = "a red circle", *, loras=(None, None, None), watermark=None, seed: int = 1):
    return (prompt, "", 1, 7.0, seed, 32, 32, "Euler", 1, *loras, 1.0, 1.0, 1.0, watermark)


def generated_pixels(result) -> np.ndarray:
    gallery = result[0]
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def studio(tiny_model_dir, bad_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-bad")
    home, tmp = root / "home", root / "tmp"
    (home / "adapters").mkdir(parents=True)
    tmp.mkdir()
    shutil.copy(good_tiny_lora(bad_corpus), home / "adapters" / "mine.safetensors")  # a user's own adapter
    with pytest.MonkeyPatch.context() as mp:  # only the studio's process sees these
        mp.setenv("ATELIER_HOME", str(home))
        mp.setenv("TMPDIR", str(tmp))
        proc, url = start_studio(tiny_model_dir, home / "outputs")
    port = url.rstrip("/").rsplit(":", 1)[1]
    try:
        first = Client(url, verbose=False).predict(*generate_args(), api_name="/on_generate")
        s = Studio(url=url, home=home, tmp=tmp, log=home / f"studio-{port}.log", baseline=generated_pixels(first))
        s.remember()
        yield s
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("\nbad inputs tried (action, via): " + json.dumps({f"{a} / {v}": n for (a, v), n in sorted(TRIED.items())}))


def refused(client: Client, api: str, *args) -> str:
    """The message of the gr.Error ``api`` answers ``args`` with."""
    try:
        result = client.predict(*args, api_name=api)
    except AppError as exc:
        return str(exc)
    pytest.fail(f"{api} accepted {args!r}: {str(result)[:300]}")


# ------------------------------------------------------------------------------------------------------ Generate


def call_raw(url: str, api: str, data: list) -> tuple[str, str]:
    """Gradio's REST API (POST /gradio_api/call/<api>, then read the event stream) with the JSON escaped to ASCII,
    for values the Python client cannot encode (a prompt holding undecodable bytes): (event, data)."""
    base = f"{url.rstrip('/')}/gradio_api/call/{api.lstrip('/')}"
    event_id = httpx.post(base, content=json.dumps({"data": data}), headers={"Content-Type": "application/json"},
                          timeout=30).json()["event_id"]
    event = ""
    with httpx.stream("GET", f"{base}/{event_id}", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                return event, line.split(":", 1)[1].strip()
    return event, ""


def test_generate_prompts(studio, bad_corpus):
    client = studio.client()
    for item in of_kind(bad_corpus, "prompt"):
        TRIED["Generate: prompt", "client"] += 1
        try:
            item.value.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes: only the raw API can send them
            event, data = call_raw(studio.url, "on_generate", list(generate_args(item.value)))
            assert event == "error", (item.name, data)
            assert_readable(json.loads(data)["error"], "prompt")
            studio.check()
            continue
        result = client.predict(*generate_args(item.value), api_name="/on_generate")
        status = result[1]
        assert "Saved" in status, (item.name, status)
        if len(item.value) > 1000:
            assert "only the first 75 are used" in status
        studio.check(new_ok=("outputs/",))
    assert studio.unexpected_errors() == []


def test_generate_bad_adapters(studio, bad_corpus):
    """Every bad adapter file in the adapters folder: each readable one is offered (as a LoRA, or as a watermark
    when it says it is one) and refused when chosen, except the LoRA that fits but was trained on another base
    (used, with a warning); unreadable ones are never offered, and the Library names them. Afterwards the model
    draws exactly what it drew before."""
    adapters = of_kind(bad_corpus, "adapter")
    for item in adapters:
        shutil.copy(item.path, studio.adapters / item.path.name)
    studio.remember()
    client = studio.client()
    choices = client.predict(api_name="/adapter_choices")
    offered = {c[1] for c in choices[0]["choices"] if c[1]}
    offered_marks = {c[1] for c in choices[3]["choices"] if c[1]}
    problems = client.predict(api_name="/library_list")[1]
    for item in adapters:
        name = item.path.name
        if name in offered:
            args, via = generate_args(loras=(name, None, None)), "Generate: adapter"
        elif name in offered_marks:
            args, via = generate_args(watermark=name), "Generate: watermark"
        else:
            assert name in problems, f"{name} is neither offered nor listed as a problem"
            TRIED["Library: list", "client"] += 1
            continue
        TRIED[via, "client"] += 1
        if item.name in ACCEPTED_ADAPTERS:
            status = client.predict(*args, api_name="/on_generate")[1]
            assert ACCEPTED_ADAPTERS[item.name] in status, (item.name, status)
            studio.check(new_ok=("outputs/",))
            continue
        assert_readable(refused(client, "/on_generate", *args), name)
        studio.check()
    again = client.predict(*generate_args(), api_name="/on_generate")  # a refused adapter left no trace
    assert np.array_equal(generated_pixels(again), studio.baseline)
    studio.check(new_ok=("outputs/",))
    assert studio.unexpected_errors() == []


# ------------------------------------------------------------------------------------------------------- Upscale


def test_upscale_images(studio, bad_corpus):
    client = studio.client()
    for item in of_kind(bad_corpus, "image"):
        TRIED["Upscale: image", "client"] += 1
        _, gallery, status = client.predict([handle_file(str(item.path))], SHIPPED_SR, "", 256, 4,
                                            api_name="/on_run")
        if item.name not in VALID_IMAGES:
            assert gallery == [] and "Upscaled 0 image(s)" in status, (item.name, status)
            problem = status.split("⚠", 1)[1]
            assert_readable(problem, item.path.name)
            studio.check()
        else:
            assert len(gallery) == 1, (item.name, status)
            with Image.open(item.path) as source, Image.open(gallery[0]["image"]) as result:
                assert result.size == (source.width * 4, source.height * 4)
            studio.check(new_ok=("outputs/upscaled/",))
    assert studio.unexpected_errors() == []


def test_upscale_bad_sr_models(studio, bad_corpus):
    """Each bad SR model, chosen from the model list and named in the official-checkpoint box."""
    folder = studio.home / "sr_models"
    folder.mkdir(exist_ok=True)
    items = of_kind(bad_corpus, "sr_model")
    for item in items:
        shutil.copy(item.path, folder / item.path.name)
    studio.remember()
    client = studio.client()
    listed = {c[1] for c in client.predict(api_name="/sr_model_choices")["choices"]}
    image = handle_file(str(next(i.path for i in bad_corpus if i.name == "rgba_png")))
    for item in items:
        name = item.path.name
        assert name in listed
        TRIED["Upscale: SR model", "client"] += 1
        assert_readable(refused(client, "/on_run", [image], name, "", 256, 4), name)
        studio.check()
        if item.name in ("sr_pickle", "sr_wrong_shapes"):  # the box reaches the same loader
            TRIED["Upscale: SR model", "client"] += 1
            assert_readable(refused(client, "/on_run", [image], SHIPPED_SR, str(item.path), 256, 4), name)
            studio.check()
    assert studio.unexpected_errors() == []


# -------------------------------------------------------------------------------------------------------- Verify


def test_verify_images(studio, bad_corpus):
    client = studio.client()
    for item in of_kind(bad_corpus, "image"):
        upload = [handle_file(str(item.path))]
        calls = [("/on_verify", (upload, KEY, None, EXTRACTOR, 1e-6))]
        if item.name in ("truncated_png", "png_bomb"):  # the other two actions read images the same way
            calls += [("/on_identify", (upload, KEY, EXTRACTOR, 1e-6)), ("/on_robust", (upload, KEY, EXTRACTOR, 1e-6))]
        for api, args in calls:
            TRIED["Verify: image", "client"] += 1
            try:
                summary, _ = client.predict(*args, api_name=api)
            except AppError as exc:
                assert item.name not in VALID_IMAGES - {"tiny_png"}, (item.name, str(exc))  # odd but valid: read
                assert_readable(str(exc), item.path.name)
            else:
                assert item.name in VALID_IMAGES, (item.name, summary)
                assert summary.strip()
            studio.check()
    assert studio.unexpected_errors() == []


def test_verify_keys(studio, bad_corpus):
    client = studio.client()
    image = [handle_file(str(next(i.path for i in bad_corpus if i.name == "rgba_png")))]
    for item in of_kind(bad_corpus, "key"):
        calls = [("/on_verify", (image, item.value, None, EXTRACTOR, 1e-6))]
        if item.name in ("key_not_hex", "key_empty"):  # the other two parse keys the same way
            calls += [("/on_identify", (image, item.value, EXTRACTOR, 1e-6)),
                      ("/on_robust", (image, item.value, EXTRACTOR, 1e-6))]
        for api, args in calls:
            TRIED["Verify: key", "client"] += 1
            assert_readable(refused(client, api, *args), "key")
            studio.check()
    assert studio.unexpected_errors() == []


# ------------------------------------------------------------------------------------------------------- Library


def test_library_import(studio, bad_corpus):
    client = studio.client()
    for item in of_kind(bad_corpus, "adapter"):
        TRIED["Library: import", "client"] += 1
        before = set(p.name for p in studio.adapters.iterdir())
        try:
            table, _, _, status = client.predict(handle_file(str(item.path)), api_name="/on_import")
        except AppError as exc:
            assert_readable(str(exc), item.path.name)
            studio.check()
            continue
        # accepted: a LoRA that fits this model's layers; the table says when it was trained on another base
        added = set(p.name for p in studio.adapters.iterdir()) - before
        assert len(added) == 1 and "Imported" in status, (item.name, status)
        row = next(r for r in table["data"] if r[0] in added)
        if item.name == "lora_foreign_fingerprint":
            assert row[table["headers"].index("base model")] == "⚠ another model"
        studio.check(new_ok=("adapters/",))
    assert studio.unexpected_errors() == []


# ------------------------------------------------------------------------------------------------------- Compose


def concept(lora, box, prompt="sks a star"):
    return [lora, 1.0, prompt, *box]


NO_CONCEPT = concept(None, [0.3, 0.25, 0.7, 0.75])
MECHANISMS = [True, True, True, "auto", 0.0, 32, 32, 1, 4.0, 1, "Model default"]


def compose_args(*concepts):
    rows = [*concepts, *[NO_CONCEPT] * (4 - len(concepts))]
    return ["gray background", "", *[v for row in rows for v in row], *MECHANISMS]


def test_compose_load_specs(studio, bad_corpus):
    client = studio.client()
    for item in of_kind(bad_corpus, "spec"):
        TRIED["Compose: load composition", "client"] += 1
        expected = SPEC_REFUSALS.get(item.name, "?")  # "?": an item added later; either answer, if readable
        try:
            loaded = client.predict(handle_file(str(item.path)), api_name="/on_load")
        except AppError as exc:
            assert expected is not None, (item.name, str(exc))
            assert_readable(str(exc), *([] if expected == "?" else [expected]))
        else:
            assert expected in (None, "?"), (item.name, "was accepted")
            assert loaded[0] == json.loads(item.path.read_text())["prompt"]  # the form holds the file's values
        studio.check()
    assert studio.unexpected_errors() == []


def test_compose_form(studio, bad_corpus):
    """Bad boxes typed into the form, a pickle named by a loaded composition, a LoRA deleted after it was chosen;
    and two concepts in the same box, which is allowed."""
    client = studio.client()
    good = str((studio.adapters / "mine.safetensors").resolve())
    client.predict(None, None, None, None, api_name="/refresh_choices")  # this session's LoRA list
    for box, fragment in (([-0.2, 0.1, 0.5, 1.3], "outside 0..1"), ([0.7, 0.1, 0.2, 0.9], "x0 must be less than x1"),
                          ([0.3, 0.2, 0.3, 0.8], "x0 must be less than x1"), ([0.1, 0.1, None, 0.9], "x1")):
        for api in ("/on_compose", "/on_save") if box[0] == 0.7 else ("/on_compose",):  # Save checks the same way
            TRIED["Compose: boxes", "client"] += 1
            assert_readable(refused(client, api, *compose_args(concept(good, box))), "concept 1.box", fragment)
            studio.check()
    spec = next(i for i in bad_corpus if i.name == "spec_pickle_lora")
    loaded = client.predict(handle_file(str(spec.path)), api_name="/on_load")
    pickle_lora = str(Path(json.loads(spec.path.read_text())["concepts"][0]["lora"]).resolve())
    assert pickle_lora in {c[1] for c in loaded[14]["choices"]}
    TRIED["Compose: LoRA", "client"] += 2
    assert_readable(refused(client, "/on_compose", *compose_args(concept(pickle_lora, [0.1, 0.1, 0.5, 0.9]))),
                    Path(pickle_lora).name)
    studio.check()
    doomed = studio.adapters / "doomed.safetensors"
    shutil.copy(good_tiny_lora(bad_corpus), doomed)
    client.predict(None, None, None, None, api_name="/refresh_choices")
    doomed.unlink()
    studio.remember()
    assert_readable(refused(client, "/on_compose", *compose_args(concept(str(doomed.resolve()), [0.1, 0.1, 0.5, 0.9]))),
                    "doomed.safetensors")
    studio.check()
    TRIED["Compose: boxes", "client"] += 1
    image, _, status = client.predict(*compose_args(concept(good, [0.2, 0.2, 0.8, 0.8]),
                                                    concept(good, [0.2, 0.2, 0.8, 0.8])), api_name="/on_compose")
    assert "Saved" in status and Path(image).is_file()
    studio.check(new_ok=("outputs/compose-",))
    assert studio.unexpected_errors() == []


# --------------------------------------------------------------------------------------------------------- Train


def preview(client: Client, folder: str, files=None, name: str = "my-lora") -> tuple[str, str]:
    return client.predict(folder, files, name, "sks", "", 1, 1, 1, 10, "LoRA", "none", api_name="/on_preview")


def start_args(folder: str, *, batch=1, steps=10):
    # common fields, the method and its preset, then each Train-tab method's own (LoRA: rank, text encoder; rsLoRA: the same; SaRA: budget, θ, λ,
    # progressive), as trainers.registry declares them
    return (folder, None, "x", "sks", "", 1, batch, 1, steps, 1e-4, 0, 100, "", "", "LoRA", "none", 4, False, 8, False,
            "5%", 0, 5e-3, 0.5)


def test_train_dataset_folders(studio, bad_corpus):
    """The dataset folder mixing good and bad files, a missing folder and a file for a folder: each read and
    described, never a job started on bad settings (no run folder appears)."""
    client = studio.client()
    mixed = next(i for i in bad_corpus if i.kind == "dataset").path
    from bad_inputs import DATASET_BAD_FILES, DATASET_GOOD_FILES

    TRIED["Train: dataset folder", "client"] += 3
    _, text = preview(client, str(mixed))
    assert text.startswith(f"{len(DATASET_GOOD_FILES)} images ×"), text
    for name in DATASET_BAD_FILES:
        line = next(line for line in text.splitlines() if name in line)
        assert_readable(line, f"skipped {name}: ")
    _, text = preview(client, str(mixed / "no-such-folder"))  # the problem first; the preset and time below it
    assert_readable(text.splitlines()[0], "does not exist")
    _, text = preview(client, str(mixed / DATASET_GOOD_FILES[0]))
    assert_readable(text.splitlines()[0], DATASET_GOOD_FILES[0])
    studio.check()
    runs = studio.home / "runs"
    refusals = [("/on_start", start_args(str(mixed / "no-such-folder")), "does not exist"),
                ("/on_start", start_args(str(mixed), batch=0), "batch size"),
                ("/on_start", start_args(str(mixed), steps=None), "steps"),
                ("/on_sr_start", (str(mixed / "no-such-folder"), SHIPPED_SR, 10, 0.1, 0.01, "x"), "does not exist"),
                ("/on_sr_start", (str(of_kind(bad_corpus, "spec")[0].path.parent), SHIPPED_SR, 10, 0.1, 0.01, "x"),
                 "no images"),
                ("/on_make", (str(mixed / "no-such-folder"), "sks", str(mixed), "w@z", "None", 24, "", "", "", "", 8,
                              4, 10, 10, 1e-3, 1, 0, False, "x", "", None), "does not exist")]
    for api, args, fragment in refusals:
        TRIED["Train: start", "client"] += 1
        assert_readable(refused(client, api, *args), fragment)
        assert not runs.is_dir() or not any(runs.iterdir()), "a job was queued for bad settings"
        studio.check()
    assert studio.unexpected_errors() == []


def test_train_watermark_start(studio, bad_corpus):
    """The Train tab's watermark section: every bad key is refused (an empty one is not bad here: a fresh key is drawn
    and shown), as are no steps and a missing or image-less folder; no job is queued for any of them."""
    client = studio.client()
    runs = studio.home / "runs"
    mixed = next(i for i in bad_corpus if i.kind == "dataset").path
    no_images = of_kind(bad_corpus, "spec")[0].path.parent
    cases = [(item.value, 4, "", "key") for item in of_kind(bad_corpus, "key") if item.value.strip()]
    cases += [("3fa9c0d21b7e", 0, "", "steps"), ("3fa9c0d21b7e", 4, str(mixed / "no-such-folder"), "does not exist"),
              ("3fa9c0d21b7e", 4, str(no_images), "no images")]
    for key, steps, images, fragment in cases:
        TRIED["Train: watermark start", "client"] += 1
        assert_readable(refused(client, "/on_wm_start", key, steps, images, "x"), fragment)
        assert not runs.is_dir() or not any(runs.iterdir()), "a job was queued for bad settings"
        studio.check()
    assert studio.unexpected_errors() == []


def upload_named(url: str, name: str, data: bytes) -> dict | None:
    """Upload ``data`` under the file name ``name`` through Gradio's upload route (what a browser sends), as the
    FileData a handler receives; None when the route refuses the name."""
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files=[("files", (name, data))], timeout=30)
    if response.status_code != 200:
        assert response.status_code < 500 or name == "", (name, response.status_code)
        return None
    path = response.json()[0]
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def test_train_upload_names(studio, bad_corpus):
    """Images uploaded under hostile names, and hostile dataset names: everything lands in the data folder's
    datasets/ under a sanitised name; nothing named x.png appears next to the data folder or above it."""
    client = studio.client()
    png = next(i for i in bad_corpus if i.name == "rgba_png").path.read_bytes()
    datasets = studio.home / "datasets"
    outside = [studio.home.parent, studio.home.parent.parent, studio.tmp]
    for item in of_kind(bad_corpus, "filename"):
        TRIED["Train: upload name", "client"] += 1
        upload = upload_named(studio.url, item.value, png)
        if upload is None:  # refused by Gradio's own route (the name '..')
            continue
        folder, text = preview(client, "", [upload], item.value)
        assert Path(folder).parent == datasets, (item.name, folder)
        stored = list(Path(folder).iterdir())
        if item.value.lower().endswith(".png"):
            assert text.startswith("1 images"), (item.name, text)
            assert len(stored) == 1 and stored[0].suffix == ".png", (item.name, stored)
        for path in stored:
            assert path.resolve().parent == Path(folder).resolve() and len(path.name) <= 120
        for parent in outside:
            assert not (parent / "x.png").exists()
        studio.check(new_ok=("datasets/",))
    assert studio.unexpected_errors() == []


# ---------------------------------------------------------------------------------------------------- the page


@pytest.mark.browser
def test_page_shows_readable_errors(studio, bad_corpus, browser, tmp_path):
    """One broken input per tab through the real page: a readable message, never a traceback or a blank."""
    item = {i.name: i for i in bad_corpus}
    foreign = item["lora_other_base_kohya"].path
    if not (studio.adapters / foreign.name).exists():
        shutil.copy(foreign, studio.adapters / foreign.name)
    studio.remember()
    page = open_tab(browser, studio.url)

    def toast(fragment: str, shot: str) -> None:
        body = page.locator(".toast-body", has_text=fragment).first
        body.wait_for(state="visible", timeout=30_000)
        text = body.inner_text()
        assert "Traceback" not in text and 'File "' not in text, text
        page.wait_for_timeout(400)  # the toast fades in
        page.screenshot(path=str(tmp_path / shot), full_page=True)
        page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")
        studio.check(new_ok=("datasets/",))

    # Generate: a LoRA for another base chosen from the list
    page.locator("#gen-loras").click()
    page.locator("#gen-lora-0 input").click()
    page.get_by_role("option", name=foreign.name).click()
    page.locator("#gen-prompt textarea").fill("a red circle")
    page.locator("#gen-steps input[type=number]").fill("1")
    page.locator("#gen-run").click()
    toast("other shapes", "generate-foreign-lora.png")
    TRIED["Generate: adapter", "page"] += 1

    # Upscale: a PNG cut off halfway
    page.get_by_role("tab", name="Upscale").click()
    page.locator("#up-files input[type=file]").set_input_files([str(item["truncated_png"].path)])
    page.locator("#up-run").click()
    page.wait_for_function("document.querySelector('#up-status')?.innerText.includes('truncated.png')",
                           timeout=30_000)
    status = page.locator("#up-status").inner_text()
    assert_readable(status.split("⚠", 1)[1], "truncated.png")
    page.screenshot(path=str(tmp_path / "upscale-truncated.png"), full_page=True)
    studio.check()
    TRIED["Upscale: image", "page"] += 1

    # Verify: a text file named .png
    page.get_by_role("tab", name="Verify").click()
    page.locator("#wm-files input[type=file]").set_input_files([str(item["text_as_png"].path)])
    page.locator("#wm-key input, #wm-key textarea").first.fill(KEY)
    page.locator("#wm-verify").click()
    toast("notes.png", "verify-text-as-png.png")
    TRIED["Verify: image", "page"] += 1

    # Library: a pickle renamed .safetensors
    page.get_by_role("tab", name="Library").click()
    page.locator("#lib-import input[type=file]").set_input_files([str(item["adapter_pickle"].path)])
    toast("not a valid .safetensors file", "library-pickle.png")  # and nothing was added (checked in toast)
    assert "mine.safetensors" in page.locator("#lib-table").inner_text()  # the table stays, not an error badge
    TRIED["Library: import", "page"] += 1

    # Compose: a composition file that is not JSON
    page.get_by_role("tab", name="Compose").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#compose-load").click()
    chooser.value.set_files(str(item["spec_malformed_json"].path))
    toast("not valid JSON", "compose-malformed.png")
    TRIED["Compose: load composition", "page"] += 1

    # Train: an image uploaded as ../../x.png lands in the datasets folder as x.png
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-upload input[type=file]").set_input_files(
        [{"name": "../../x.png", "mimeType": "image/png", "buffer": item["rgba_png"].path.read_bytes()}])
    page.wait_for_function("document.querySelector('#train-arithmetic textarea')?.value.includes('1 images')",
                           timeout=30_000)
    folder = Path(page.locator("#train-folder textarea, #train-folder input").first.input_value())
    assert folder.parent == studio.home / "datasets" and [p.name for p in folder.iterdir()] == ["x.png"]
    for parent in (studio.home.parent, studio.home.parent.parent, studio.tmp):
        assert not (parent / "x.png").exists()
    page.screenshot(path=str(tmp_path / "train-traversal-upload.png"), full_page=True)
    studio.check(new_ok=("datasets/",))
    TRIED["Train: upload name", "page"] += 1
    assert studio.unexpected_errors() == []


def test_a_refusal_is_one_line_in_the_log(studio):
    """The studio's log gets one 'refused: ...' line for a user's mistake, not a traceback (ATELIER_DEBUG unset)."""
    start = studio.log.stat().st_size
    image = [handle_file(str(sorted((studio.home / "outputs").glob("*.png"))[0]))]
    message = refused(studio.client(), "/on_verify", image, "not-hex", None, EXTRACTOR, 1e-6)
    time.sleep(0.5)  # the server writes its log line after answering
    text = studio.log.read_bytes()[start:].decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if line.startswith("refused: ")]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    first_words = lines[0].removeprefix("refused: ")[:30]
    assert first_words in message, (lines, message)


def test_still_serves_and_nothing_was_lost(studio):
    """After all of it: the page loads, a good request gives the very image it gave first, the user's own adapter
    and first image are untouched."""
    with urllib.request.urlopen(studio.url, timeout=15) as response:
        assert response.status == 200
    again = studio.client().predict(*generate_args(), api_name="/on_generate")
    assert np.array_equal(generated_pixels(again), studio.baseline)
    first = sorted((studio.home / "outputs").glob("00000-*.png"))
    assert first and studio.saved[f"outputs/{first[0].name}"] == sha256(first[0])
    assert studio.saved["adapters/mine.safetensors"] == sha256(studio.adapters / "mine.safetensors")
    assert studio.unexpected_errors() == []
    actions = {action for action, _ in TRIED}
    print(f"\nbad input through the page: {sum(TRIED.values())} cases over {len(actions)} actions "
          f"({sum(n for (_, via), n in TRIED.items() if via == 'client')} through Gradio's client, "
          f"{sum(n for (_, via), n in TRIED.items() if via == 'page')} through the page)")
