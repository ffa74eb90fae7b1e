"""The studio page: tabs arranged, services wired, server started on localhost unless asked otherwise."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from adapters.library import adapters_folder
from models.cache import ModelCache, ModelSpec
from core.paths import REPO_ROOT, data_home, default_outputs
from pipelines.upscale import SRModelCache
from trainers.jobs import JobQueue

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Gradio keeps each session (every page load, every API client) in memory until this many newer ones exist; with its
# default of 10 000 the studio's memory grew with every session in bench/concurrent_sessions.py. The least recently
# used session beyond this number is dropped (its gr.State values, e.g. the last seed, start from the defaults again).
SESSIONS_KEPT = 100
# Ctrl+Enter (⌘+Enter) runs the visible tab's main button, as in A1111: Generate, Compose, Upscale, Verify. Training
# is not started by a keystroke.
CTRL_ENTER_JS = """
() => {
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey)) return;
    for (const id of ["gen-run", "compose-run", "up-run", "wm-verify"]) {
      const b = document.getElementById(id);
      if (b && b.offsetParent !== null && !b.disabled) { e.preventDefault(); b.click(); return; }
    }
  });
}
"""


@dataclass
class StudioConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None
    config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    outputs: str | None = None
    auth: str | None = None  # "user:password"
    share: bool = False

    @property
    def outputs_dir(self) -> Path:
        return Path(self.outputs).expanduser().resolve() if self.outputs else default_outputs()


def parse_auth(auth: str | None) -> list[tuple[str, str]] | None:
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must look like user:password")
    return [(user, password)]


def exposure_warning(config: StudioConfig) -> str | None:
    """A warning when the studio is reachable from other machines without a login."""
    if (config.share or config.host not in LOCAL_HOSTS) and not config.auth:
        where = "a public share link" if config.share else f"{config.host}"
        return (f"warning: the studio is exposed on {where} without a login; anyone who can reach it can use this "
                "machine. Add --auth user:password.")
    return None


def served_folders(config: StudioConfig) -> list[str]:
    """What Gradio may serve besides its own upload cache: the outputs folder, as a whole. One that would also serve
    the home folder, the data folder (adapters, runs, datasets) or the studio's code is refused."""
    outputs = config.outputs_dir.resolve()
    for label, inner in (("your home folder", Path.home()), ("the data folder", data_home()),
                         ("the studio's code", REPO_ROOT)):
        if inner.resolve().is_relative_to(outputs):
            raise UserError(f"--outputs {outputs} holds {label} ({inner}), and the page serves the outputs folder "
                            "to everyone who can open it: choose a folder of its own")
    return [str(outputs)]


def build_studio(config: StudioConfig):
    # Gradio and the tabs (each imports Gradio at its top) load only here, when the page is built: serve() refuses a
    # bad --auth or --outputs before paying for them, and `from app.studio import StudioConfig` (tests, bench) needs
    # no Gradio.
    import gradio as gr

    from app.compose_tab import build_compose_tab
    from app.generate_tab import SENT_SETTINGS, build_generate_tab, image_to, settings_to_compose
    from app.library_tab import build_library_tab
    from app.train_tab import build_train_tab
    from app.upscale_tab import build_upscale_tab
    from app.verify_tab import build_verify_tab

    models = ModelCache(ModelSpec(source=config.model, config=config.config, device=config.device,
                                  dtype=config.dtype, attention=config.attention))
    model = models.peek()  # load now: a bad --model fails at start with one line, not at the first click
    outputs = config.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    jobs = JobQueue(data_home() / "runs")
    sr_models = SRModelCache(data_home(), device=config.device)
    with gr.Blocks(title="Atelier", analytics_enabled=False) as demo:
        gr.Markdown(f"# Atelier\nModel **{model.name}** · fingerprint `{model.fingerprint}` · "
                    f"{model.runtime.describe()}", elem_id="studio-header")
        with gr.Tabs(elem_id="studio-tabs") as tabs:
            with gr.Tab("Generate", id="generate"):
                generate = build_generate_tab(demo, models, outputs, adapters_folder(data_home()), sr_models)
            with gr.Tab("Compose", id="compose"):
                compose = build_compose_tab(demo, models, outputs, adapters_folder(data_home()))
            with gr.Tab("Train", id="train"):
                build_train_tab(demo, jobs, data_home(), config.model)
            with gr.Tab("Upscale", id="upscale"):
                upscale_images = build_upscale_tab(demo, sr_models, data_home(), outputs)
            with gr.Tab("Verify", id="verify"):
                verify_images = build_verify_tab(demo, data_home(), adapters_folder(data_home()))
            with gr.Tab("Library", id="library"):
                build_library_tab(demo, models, adapters_folder(data_home()))
        # The Generate tab's sends: the selected image (or its settings) into another tab, which is then shown.
        # Queued, so their toasts reach the page; no progress over the fields they fill.
        quiet = {"show_progress": "hidden", "api_visibility": "private"}
        generate.to_upscale.click(image_to("upscale"), generate.selected, [upscale_images, tabs], **quiet)
        generate.to_verify.click(image_to("verify"), generate.selected, [verify_images, tabs], **quiet)
        generate.to_compose.click(settings_to_compose, generate.selected,
                                  [*(getattr(compose, name) for name in SENT_SETTINGS), tabs], **quiet)
        demo.load(None, None, None, js=CTRL_ENTER_JS)
    jobs.start_background()
    demo.queue(default_concurrency_limit=1)
    return demo


def serve(config: StudioConfig, *, block: bool = True):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = parse_auth(config.auth)
    warning = exposure_warning(config)
    if warning:
        print(warning, file=sys.stderr)
    allowed = served_folders(config)
    demo = build_studio(config)
    print(f"Atelier on http://{config.host}:{config.port}  (outputs: {config.outputs_dir})", flush=True)
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, auth=auth,
                allowed_paths=allowed,
                ssr_mode=False, show_error=True, quiet=True, prevent_thread_lock=not block, inbrowser=False,
                state_session_capacity=SESSIONS_KEPT)
    return demo
