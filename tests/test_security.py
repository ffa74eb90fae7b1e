"""The studio's security promises, checked against a running studio (with a login) and the code itself:

(a) the server reads nothing outside its folders: Gradio's file route refuses every path outside the outputs folder
    (and the samples of a run the page shows), however it is spelled; (b) uploaded names are sanitised wherever an
    upload is copied into the data folder; (c) no user file is ever unpickled: a static scan of the code and every
    loader fed a pickle that would create a marker file; (d) it listens on localhost by default; (e) exposing it
    prints a warning that suggests --auth; (f) with --auth, the API refuses a client without credentials.
"""
from __future__ import annotations

import ast
import http.client
import pickle
import pickletools
import socket
import subprocess
import threading
import sys
import urllib.parse
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError
from PIL import Image

from bad_inputs import good_tiny_lora, of_kind
from conftest import REPO, free_port, start_studio
from core.errors import UserError
from core.paths import safe_name

pytestmark = pytest.mark.slow

AUTH = ("ada", "s3cret")
RUN = "20250101-000000-lora-old"


class Studio:
    def __init__(self, url: str, root: Path, home: Path, tmp: Path) -> None:
        self.url, self.root, self.home, self.tmp = url, root, home, tmp
        self.outputs = home / "outputs"
        self.cookie = self._login()

    def _login(self) -> str:
        response = httpx.post(f"{self.url}login", data={"username": AUTH[0], "password": AUTH[1]}, timeout=30)
        assert response.status_code == 200, response.text
        return "; ".join(f"{k}={v}" for k, v in response.cookies.items())

    def get(self, raw_path: str, *, logged_in: bool = True) -> int:
        """GET a path exactly as written (no client-side normalising of '..' or %-escapes); the status code."""
        parts = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", raw_path, headers={"Cookie": self.cookie} if logged_in else {})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def client(self) -> Client:
        return Client(self.url, auth=AUTH, verbose=False)


@pytest.fixture(scope="module")
def studio(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    home, tmp = root / "home", root / "tmp"
    tmp.mkdir()
    (root / "secret.txt").write_text("next to the data folder: never served\n")
    (tmp / "other.txt").write_text("in the studio's TMPDIR but not an upload: never served\n")
    run = home / "runs" / RUN  # a finished run: its record and checkpoint are not for the page, its samples are
    (run / "samples").mkdir(parents=True)
    (run / "job.json").write_text('{"method": "lora", "args": ["--data", "/home/ada/private"], "state": "done"}')
    Image.new("RGB", (8, 8), (200, 30, 30)).save(run / "samples" / "000010-0.png")
    (run / "events.jsonl").write_text('{"time": 0, "event": "sample", "step": 10, "paths": ["samples/000010-0.png"], '
                                      '"prompts": ["a red circle"]}\n')  # what the preview grid reads
    (home / "adapters").mkdir()
    (home / "adapters" / "mine.safetensors").write_bytes(b"an adapter is not served")
    outputs = home / "outputs"
    outputs.mkdir()
    Image.new("RGB", (8, 8), (30, 30, 200)).save(outputs / "00000-1.png")
    (outputs / "link.txt").symlink_to(root / "secret.txt")  # a link out of the outputs folder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATELIER_HOME", str(home))
        mp.setenv("TMPDIR", str(tmp))
        proc, url = start_studio(tiny_model_dir, outputs, "--auth", f"{AUTH[0]}:{AUTH[1]}")
    try:
        yield Studio(url, root, home, tmp)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- (a) file route


def test_file_route_serves_only_the_outputs(studio):
    def file(path: str) -> str:
        return f"/gradio_api/file={path}"

    out, root, home = str(studio.outputs), str(studio.root), str(studio.home)
    assert studio.get(file(f"{out}/00000-1.png")) == 200
    assert studio.get(file(f"{out}/00000-1.png"), logged_in=False) in (401, 403)
    refused = [
        file("/etc/passwd"), file(str(REPO / "launch.py")), file(str(REPO / "README.md")), file("launch.py"),
        file(f"{root}/secret.txt"), file(f"{home}/adapters/mine.safetensors"), file(f"{home}/runs/{RUN}/job.json"),
        file(f"{home}/runs/{RUN}"), file(f"{studio.tmp}/other.txt"), file(f"{out}/link.txt"),
        file(f"{out}/../../secret.txt"), file(f"{out}/%2e%2e/%2e%2e/secret.txt"), file(f"{out}/..%2F..%2Fsecret.txt"),
        file(f"{out}/%252e%252e/%252e%252e/secret.txt"), file(f"{out}/..\\..\\secret.txt"),
        file(urllib.parse.quote(f"{root}/secret.txt", safe="")), file(f"{out}/../runs/{RUN}/job.json"),
        file(f"{out}%2F..%2F..%2Fsecret.txt"), file(f"//{root.lstrip('/')}/secret.txt"),
        file(f"file://{root}/secret.txt"), "/file=/etc/passwd", file(f"{out}/00000-1.png/../../../secret.txt"),
    ]
    statuses = {path: studio.get(path) for path in refused}
    served = {path: code for path, code in statuses.items() if code not in (400, 403, 404)}
    assert not served, served
    print(f"\n{len(refused)} requests outside the served folders refused: {sorted(set(statuses.values()))}")


def test_a_runs_samples_are_served_only_once_the_page_shows_them(studio):
    sample = f"/gradio_api/file={studio.home}/runs/{RUN}/samples/000010-0.png"
    assert studio.get(sample) == 403  # the runs folder is not served as a whole
    client = studio.client()
    client.predict(None, api_name="/on_refresh")  # the page's load: this session's list of runs
    grid = client.predict(RUN, api_name="/on_tick")[4]  # progress, loss, validation and lr plots, samples, log, ...
    samples = grid["value"]  # an update: the grid's columns follow the run's preview prompts
    assert len(samples) == 1 and Path(samples[0]["image"]).is_file()
    assert studio.get(sample) == 200
    assert studio.get(f"/gradio_api/file={studio.home}/runs/{RUN}/job.json") == 403


def test_outputs_folder_may_not_hold_the_home_data_or_code(tmp_path):
    from app.studio import StudioConfig, served_folders
    from core.paths import data_home

    assert served_folders(StudioConfig(outputs=str(tmp_path / "outputs"))) == [str((tmp_path / "outputs").resolve())]
    for outputs in ("/", str(Path.home()), str(data_home()), str(data_home().parent), str(REPO)):
        with pytest.raises(UserError, match="choose a folder of its own"):
            served_folders(StudioConfig(outputs=outputs))


# --------------------------------------------------------------------------------------------- (b) upload names


def test_safe_name_on_hostile_names(bad_corpus):
    for item in of_kind(bad_corpus, "filename"):
        name = safe_name(item.value)
        assert name and "/" not in name and "\\" not in name and "\0" not in name and "\n" not in name, item.name
        assert not name.startswith(".") and len(name) <= 120 and name not in (".", ".."), item.name
        if item.value.endswith(".png"):
            assert name.endswith(".png"), item.name  # shortened before the suffix: still an image


def test_uploads_land_in_the_data_folder_under_safe_names(studio, bad_corpus):
    """The Library's import and the Upscale tab (the Train tab's upload is in test_bad_input_ui) given files under
    hostile names: each lands in its folder under the sanitised name, and nothing named x appears anywhere above."""
    client = studio.client()
    lora = good_tiny_lora(bad_corpus).read_bytes()
    png = next(i.path for i in bad_corpus if i.name == "rgba_png").read_bytes()
    adapters, upscaled = studio.home / "adapters", studio.outputs / "upscaled"
    tried, imported = 0, set()
    for item in of_kind(bad_corpus, "filename"):
        for data, name, api, args in ((lora, f"{item.value}.safetensors", "/on_import", ()),
                                      (png, item.value, "/on_run", ("Shipped SPAN ×4", "", 256, 4))):
            response = httpx.post(f"{studio.url}gradio_api/upload", files=[("files", (name, data))],
                                  headers={"Cookie": studio.cookie}, timeout=30)
            if response.status_code != 200:  # Gradio's route refuses some names itself ('..')
                assert response.status_code == 400, (name, response.status_code)
                continue
            path = response.json()[0]
            assert Path(path).parent.parent == studio.tmp / "gradio", path  # Gradio's upload folder, one level down
            file = {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
            before = set(adapters.iterdir()) | (set(upscaled.iterdir()) if upscaled.is_dir() else set())
            try:
                client.predict(file if api == "/on_import" else [file], *args, api_name=api)
            except Exception as exc:  # a refusal is fine (e.g. a name that does not end in .png); a stray file is not
                assert "Traceback" not in str(exc)
            tried += 1
            after = set(adapters.iterdir()) | (set(upscaled.iterdir()) if upscaled.is_dir() else set())
            if after - before and api == "/on_import":
                imported.add(item.name)
            for new in after - before:  # NAME.safetensors (NAME-1 … when taken) or NAME_x4.png
                assert new.parent in (adapters, upscaled) and len(new.name) <= 130, new
                stored = Path(path).name  # as Gradio's upload route stored it (it %-escapes NUL and newline)
                assert new.name.startswith(Path(safe_name(stored)).stem[:100]), (name, new.name)
    for parent in (studio.home, studio.root, studio.root.parent, studio.tmp, studio.outputs):
        assert not any(parent.glob("x.*")), parent
    assert tried >= len(of_kind(bad_corpus, "filename"))
    # hostile names are not refused wholesale: the adapter is kept, under a safe name
    assert {"name_traversal_posix", "name_traversal_windows", "name_absolute", "name_unicode"} <= imported, imported


# ------------------------------------------------------------------------------------------------- (c) pickles

CODE = [*(path for package in ("adapters", "app", "cli", "core", "microworld", "models", "pipelines", "trainers")
          for path in sorted((REPO / package).rglob("*.py"))), REPO / "launch.py"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "not a constant"
    return None


def test_no_pickle_loading_in_the_code():
    """Every .py of the app, the pipelines, the trainers and the launcher: no pickle-family import, torch.load only
    with weights_only=True, no np.load with allow_pickle, no from_pretrained(use_safetensors=False), no
    pandas.read_pickle."""
    problems = []
    for path in CODE:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.split(".")[0] in UNSAFE_MODULES:
                        problems.append(f"{where}:{node.lineno}: imports {name}")
            if not isinstance(node, ast.Call):
                continue
            func = _dotted(node.func)
            last = func.rsplit(".", 1)[-1]
            if func == "torch.load" and _keyword(node, "weights_only") is not True:
                problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if func in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
            if last == "from_pretrained" and _keyword(node, "use_safetensors") is False:
                problems.append(f"{where}:{node.lineno}: from_pretrained(use_safetensors=False)")
            if last in ("read_pickle", "loads") and func.split(".")[0] in ("pd", "pandas", *UNSAFE_MODULES):
                problems.append(f"{where}:{node.lineno}: {func}")
    assert len(CODE) > 30
    assert not problems, "\n".join(problems)


class _Touch:
    """Unpickling an instance calls ``open(marker, "w")``: the marker file proves that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch reads the header before it refuses
def test_a_disguised_pickle_is_refused_by_every_loader_without_being_loaded(tmp_path):
    from adapters.lora.files import load_lora
    from adapters.library import import_adapter
    from models.loading import load_model
    from adapters.sara.files import load_sparse_delta
    from pipelines.upscale import load_sr_model
    from pipelines.watermark.extractor import load_extractor
    from pipelines.watermark.merge import load_watermark
    from pipelines.watermark.verify import key_from_adapter
    from trainers.checkpoints import FILES, load_checkpoint

    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"state_dict": {"lora_unet_x.lora_down.weight": _Touch(marker)}}, protocol=4)
    # The payload really would run code: it calls builtins.open (read from its opcodes, never by loading it).
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(payload)]
    assert ("SHORT_BINUNICODE", "open") in ops and ("STACK_GLOBAL", None) in ops and ("REDUCE", None) in ops
    files = {}
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        files[suffix] = tmp_path / f"evil{suffix}"
        files[suffix].write_bytes(payload)
    checkpoint = tmp_path / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    for name in FILES[:2]:
        (checkpoint / name).write_bytes(payload)
    (checkpoint / FILES[2]).write_text('{"step": 10, "epoch": 0, "batch": 0, "rng": {}, "optimizer": {}, '
                                       '"scheduler": {}, "extra": {}}')
    folder = tmp_path / "pipeline"  # a diffusers folder whose UNet weights are only a pickle
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)
    st = files[".safetensors"]
    loaders = {
        "adapter_files.load_lora": lambda: load_lora(st),
        "adapter_files.load_lora (.ckpt)": lambda: load_lora(files[".ckpt"]),
        "library.import_adapter": lambda: import_adapter(st, tmp_path / "adapters", None),
        "sparse_delta.load_sparse_delta": lambda: load_sparse_delta(st),
        "sparse_delta.load_sparse_delta (.pt)": lambda: load_sparse_delta(files[".pt"]),
        "upscale.load_sr_model": lambda: load_sr_model(st),
        "upscale.load_sr_model (.pth)": lambda: load_sr_model(files[".pth"]),
        "upscale.load_sr_model (.pth, official)": lambda: load_sr_model(files[".pth"], allow_pth=True),
        "loading.load_model (single file)": lambda: load_model(st),
        "loading.load_model (.ckpt)": lambda: load_model(files[".ckpt"]),
        "loading.load_model (.bin)": lambda: load_model(files[".bin"]),
        "loading.load_model (folder of pickles)": lambda: load_model(folder),
        "watermark.load_watermark": lambda: load_watermark(st),
        "watermark.key_from_adapter": lambda: key_from_adapter(st),
        "watermark.load_extractor": lambda: load_extractor(st),
        "checkpoints.load_checkpoint": lambda: load_checkpoint(checkpoint),
    }
    for label, load in loaders.items():
        with pytest.raises(UserError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and message.strip(), (label, message)
        assert not marker.exists(), f"{label} unpickled the file"
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


# ---------------------------------------------------------------------------------------- (d) (e) (f) exposure


def test_localhost_by_default():
    import launch
    from app.studio import StudioConfig

    parser = launch.build_parser()
    assert parser.parse_args([]).host == "127.0.0.1" and StudioConfig().host == "127.0.0.1"
    assert "default: 127.0.0.1" in " ".join(parser.format_help().split())


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_not_reachable_from_other_addresses(studio):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    port = urllib.parse.urlsplit(studio.url).port
    with pytest.raises(OSError):
        socket.create_connection((address, port), timeout=3).close()
    socket.create_connection(("127.0.0.1", port), timeout=3).close()  # while it listens on loopback


def test_exposure_warning_suggests_auth():
    from app.studio import StudioConfig, exposure_warning

    for config in (StudioConfig(host="0.0.0.0"), StudioConfig(host="192.168.1.5"), StudioConfig(share=True)):
        warning = exposure_warning(config)
        assert warning and warning.startswith("warning:") and "--auth" in warning, config
    assert "share link" in exposure_warning(StudioConfig(share=True))
    for config in (StudioConfig(), StudioConfig(host="localhost"), StudioConfig(host="0.0.0.0", auth="a:b"),
                   StudioConfig(share=True, auth="a:b")):
        assert exposure_warning(config) is None, config


def test_a_real_start_on_all_interfaces_warns(tiny_model_dir, tmp_path):
    """``launch.py --host 0.0.0.0`` prints the warning before it loads anything; stopped as soon as it has."""
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--host", "0.0.0.0", "--port", str(free_port()),
                             "--model", str(tiny_model_dir), "--outputs", str(tmp_path / "outputs")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    watchdog = threading.Timer(120, proc.kill)  # a start that never warns ends the wait (readline then sees EOF)
    watchdog.start()
    try:
        line = ""
        while True:
            line = proc.stderr.readline()
            if not line or line.startswith("warning:"):
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=30)
    assert line.startswith("warning:") and "0.0.0.0" in line and "--auth" in line, line


def test_auth_is_required_by_the_api(studio):
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(studio.url, verbose=False)  # cannot even read the app's config without a login
    call = httpx.post(f"{studio.url}gradio_api/call/verify_choices", json={"data": []}, timeout=30)
    assert call.status_code in (401, 403), call.status_code
    assert httpx.get(f"{studio.url}config", timeout=30).status_code in (401, 403)
    choices = studio.client().predict(api_name="/verify_choices")  # with the login, the same call works
    assert "shipped extractor" in str(choices)
    with pytest.raises(ValueError, match="Could not login"):  # the login is refused
        Client(studio.url, auth=(AUTH[0], "wrong"), verbose=False)
