"""`python run.py ui`: every job from a browser, and every run under the output folder in a gallery.

One tab per job, its form generated from the job's config dataclass (ui/form.py); a Runs tab of past runs. Jobs run
in this process, one at a time (Gradio's queue, one concurrency slot shared by every job). Their bars report to
`gr.Progress`, and Cancel stops a job at its next step as Ctrl-C would (pipelines/progress.py).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import gradio as gr
import yaml

from dreamfusion.config import ThreeDConfig
from fourd.config import FourDConfig
from pipelines.errors import UserError, disk_error
from pipelines.options import ImageConfig
from pipelines.progress import Cancelled, watch
from pipelines.rundir import make_output_dir
from video.config import VideoConfig

from .config import UIConfig
from .form import UNSET, Form, Input, model_choices, motion_choices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tab:
    """A job the app runs: as in run.py's JOBS (a test keeps them equal), plus its tab title and API name."""

    job: str
    title: str
    cls: type
    module: str
    section: str | None

    @property
    def name(self) -> str:
        """The job as an HTML id (ids do not start with a digit)."""
        return {"3d": "threed", "4d": "fourd"}.get(self.job, self.job)


TABS = (Tab("image", "Image", ImageConfig, "pipelines.image", None),
        Tab("video", "Video", VideoConfig, "video.pipeline", None),
        Tab("3d", "3D", ThreeDConfig, "dreamfusion.fit", "3d"),
        Tab("4d", "4D", FourDConfig, "fourd.fit", "4d"))
RESUMABLE = ("3d", "4d")  # jobs the Runs tab's Resume continues
EXAMPLES = {"image": "a red cube", "video": "a red ball moving right", "3d": "a red cube", "4d": "a red ball moving right"}


def component(inp: Input, shown) -> gr.components.Component:
    """The form field of one option, showing `shown` (`Input.shown`): its dotted key as the label, its help as the hint."""
    common = {"label": inp.key, "info": inp.help, "value": shown}
    if inp.key == "model":
        return gr.Dropdown(choices=model_choices(), allow_custom_value=True, **common)
    if inp.key == "motion":
        return gr.Dropdown(choices=motion_choices(), allow_custom_value=True, **common)
    if inp.kind == "bool":
        return gr.Checkbox(**common)
    if inp.kind == "optional-bool":
        return gr.Dropdown(choices=[UNSET, "true", "false"], **common)
    if inp.kind == "list" and inp.choices:
        return gr.CheckboxGroup(choices=list(inp.choices), **common)
    if inp.choices:
        return gr.Dropdown(choices=([("default", "")] if inp.optional else []) + [(c, c) for c in inp.choices], **common)
    if inp.kind in ("int", "float"):
        return gr.Number(**common)  # whole numbers are checked, not rounded: steps=2.5 fails as on the CLI
    return gr.Textbox(**common)


def outputs_of(job: str, run: Path) -> dict:
    """What a finished run shows: `images`, `video`, `gif`, `model` (GLB), `turntable`, `orbit` and `files`."""
    found = {"images": sorted(str(p) for p in run.glob("image_*.png"))}
    for key, name in (("video", "video.mp4"), ("gif", "preview.gif"), ("model", "mesh.glb"),
                      ("turntable", "turntable.mp4"), ("orbit", "orbit.mp4")):
        found[key] = str(run / name) if (run / name).is_file() else None
    found["files"] = [str(p) for p in sorted(run.glob("mesh.*")) if p.suffix in (".obj", ".mtl", ".glb", ".ply")]
    found["files"] += [str(p) for p in sorted(run.glob("frames/frame_*.ply"))]  # a 4d run's per-frame meshes
    return found


def _blank_png(folder: Path) -> str:
    """A grey square, the thumbnail of a run with no picture yet."""
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 200, 200)).save(folder / "blank.png")
    return str(folder / "blank.png")


def _first_view(strip: Path, folder: Path) -> str:
    """The first (square) view of a 3D fit's strip of training views, cached in the app's own scratch folder."""
    from PIL import Image

    key = hashlib.sha1(f"{strip.resolve()}:{strip.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cached = folder / f"{key}.png"
    if not cached.is_file():
        with Image.open(strip) as image:
            image.crop((0, 0, image.height, image.height)).save(cached)
    return str(cached)


class App:
    """The app's state: the output folder, the forms, and the one job running now (with its stop flag)."""

    def __init__(self, out: str | Path = "outputs", progress: bool = True):
        self.out, self.progress = Path(out), progress
        self.forms = {t.job: Form(t.job, t.cls, t.section) for t in TABS}
        self.stop = threading.Event()  # set by Cancel from the session whose job is running
        self.busy = threading.Lock()  # one job at a time, even while a cancelled one is still unwinding
        self.running: str | None = None  # the session whose job runs now
        self.cancelled: set[str] = set()  # sessions that pressed Cancel while their job was still waiting
        self.scratch = Path(tempfile.mkdtemp(prefix="text2world-ui-"))  # thumbnails
        self.blank = _blank_png(self.scratch)

    # ------------------------------------------------------------------------------------------- jobs
    def run_job(self, tab: Tab, cfg, prompt: str | None, progress: gr.Progress, session: str | None = None) -> Path:
        """Run one job to its run folder; its own errors become one-line gr.Errors, as the CLI prints them."""
        def report(desc: str, done: int, total: int | None) -> None:
            progress((done, total) if total else None, desc=desc)

        with self.busy:
            if session in self.cancelled:  # Cancel was pressed while this job waited for the one before it
                self.cancelled.discard(session)
                raise gr.Error("Cancelled before it started.")
            self.stop.clear()
            self.running = session
            try:
                with watch(report, self.stop):
                    main = importlib.import_module(tab.module).main
                    runs = main(cfg, [prompt] if prompt is not None else None, self.out, progress=self.progress)
            except Cancelled:
                raise gr.Error("Cancelled, as Ctrl-C would: a new run's folder is removed; a 3D fit keeps its "
                               "checkpoint (Runs, then Resume).") from None
            except UserError as e:
                raise gr.Error(str(e)) from None
            except Exception as e:
                reason = disk_error(e)
                if reason is None:
                    raise
                raise gr.Error(f"{reason}; free some space or start the app with --out DIR") from None
            finally:
                self.running = None
        return Path(runs[0])

    def generate(self, tab: Tab, prompt: str, values: list, shown_model: str, progress: gr.Progress,
                 session: str | None = None):
        if not str(prompt or "").strip():
            raise gr.Error('The prompt is empty: write what to generate, e.g. "a red cube".')
        try:
            cfg = self.forms[tab.job].config(values, shown_model)
        except UserError as e:
            raise gr.Error(str(e)) from None
        run = self.run_job(tab, cfg, prompt.strip(), progress, session)
        return self.show(tab.job, run)

    def show(self, job: str, run: Path) -> tuple:
        """A run's outputs in its tab's output components' order."""
        found = outputs_of(job, run)
        if job == "image":
            return found["images"], str(run)
        if job == "video":
            return found["video"], found["gif"], str(run)
        if job == "4d":
            return found["model"], found["video"], found["orbit"], found["files"], str(run)
        return found["model"], found["turntable"], found["files"], str(run)

    def resume(self, run: Path, progress: gr.Progress, session: str | None = None, job: str = "3d") -> Path:
        """Continue an interrupted 3D or 4D run with its own options, as `run.py JOB --resume RUN_DIR`."""
        form = self.forms[job]
        cfg = form.config(form.defaults_for(form.model))
        cfg.resume = str(run)
        return self.run_job(next(t for t in TABS if t.job == job), cfg, None, progress, session)

    def cancel(self, session: str | None = None) -> None:
        """Cancel this session's job: the running one at its next step, or a waiting one before it starts."""
        if self.running == session:
            self.stop.set()
        elif session is not None:
            self.cancelled.add(session)

    # ------------------------------------------------------------------------------------------- runs
    def runs(self) -> list[dict]:
        """Past runs of the app's jobs under the output folder, newest first."""
        found = []
        for tab in TABS:
            for folder in (self.out / tab.job).glob("*/config.yaml"):
                try:
                    saved = yaml.safe_load(folder.read_text(encoding="utf-8"))
                    started = (folder.parent / "config.yaml").stat().st_mtime  # written once, when the run began
                except (OSError, UnicodeDecodeError, yaml.YAMLError):
                    continue  # gone, or not a run this app wrote: left out, not an error
                if not isinstance(saved, dict):
                    continue
                found.append({"path": folder.parent, "job": tab.job, "prompt": str(saved.get("prompt", "")),
                              "model": str(saved.get("model", "")), "time": started,
                              "finished": (folder.parent / "metadata.json").is_file()})
        return sorted(found, key=lambda r: r["time"], reverse=True)

    def thumbnail(self, run: dict) -> str | None:
        """A picture of a run: its first image, the video's GIF, or the first of a strip of views: a 4d run's
        frames, or a 3D fit's (a 4d run's static fit's) last training views."""
        path = run["path"]
        for candidate in [*sorted(path.glob("image_*.png"))[:1], path / "preview.gif"]:
            if candidate.is_file():
                return str(candidate)
        views = sorted(path.glob("val/*.png")) or sorted(path.glob("3d/*/val/*.png"))
        views = [path / "frames.png"] if (path / "frames.png").is_file() else views
        try:
            return _first_view(views[-1], self.scratch) if views else None
        except (OSError, ValueError):  # gone or damaged: no picture
            return None


def _api_function(keys: list[str], call) -> Callable:
    """fn(prompt, *values, shown_model, progress) with a signature naming each option (`guidance.scale` as
    `guidance__scale`), so the API's parameters have the options' names, and every one but the prompt a default."""
    def fn(prompt, *rest, progress=gr.Progress(), request: gr.Request = None):
        *values, shown = rest
        return call(prompt, list(values), shown, progress, _session(request))

    kind, keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter("prompt", kind), *(inspect.Parameter(k.replace(".", "__"), kind, default=None) for k in keys),
         inspect.Parameter("shown_model", kind, default=None),
         inspect.Parameter("progress", keyword, default=gr.Progress()),
         inspect.Parameter("request", keyword, default=None, annotation=gr.Request)])
    return fn


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def _markdown(text: str) -> str:
    """`text` shown as itself in gr.Markdown: no link, image or emphasis a prompt could smuggle in."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def _tab(app: App, tab: Tab) -> dict:
    """One job's tab: prompt, common options, Advanced, Generate/Cancel, and its outputs."""
    form = app.forms[tab.job]
    defaults = form.defaults_for(form.model)
    with gr.Tab(tab.title, id=f"tab-{tab.name}", elem_id=f"{tab.name}-tab"):
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", placeholder=EXAMPLES[tab.job], elem_id=f"{tab.name}-prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{tab.name}-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id=f"{tab.name}-cancel")
                fields = [component(i, d) for i, d in zip(form.common, defaults)]
                with gr.Accordion("Advanced", open=False):
                    fields += [component(i, d) for i, d in zip(form.advanced, defaults[len(form.common):])]
            with gr.Column(scale=1):
                if tab.job == "image":
                    outputs = [gr.Gallery(label="images", columns=2, elem_id="image-gallery")]
                elif tab.job == "video":
                    outputs = [gr.Video(label="video.mp4", autoplay=True, loop=True), gr.File(label="preview.gif")]
                elif tab.job == "4d":
                    outputs = [gr.Model3D(label="mesh.glb (animated)", elem_id="fourd-viewer", height=420),
                               gr.Video(label="video.mp4", autoplay=True, loop=True),
                               gr.Video(label="orbit.mp4", autoplay=True, loop=True),
                               gr.File(label="meshes", file_count="multiple")]
                else:
                    outputs = [gr.Model3D(label="mesh.glb", elem_id="threed-viewer", height=420),
                               gr.Video(label="turntable.mp4", autoplay=True, loop=True),
                               gr.File(label="meshes", file_count="multiple")]
                folder = gr.Textbox(label="run folder", interactive=False)
        shown_model = gr.State(form.model)  # the model whose defaults the form shows (see Form.config)
    run = _api_function([i.key for i in form.ordered], lambda p, values, shown, progress, session: app.generate(
        tab, p, values, shown, progress, session))
    job = {"inputs": [prompt, *fields, shown_model], "outputs": [*outputs, folder], "concurrency_limit": 1,
           "concurrency_id": "jobs"}
    generate.click(run, api_name=f"generate_{tab.job}", **job)
    prompt.submit(run, api_visibility="private", **job)
    def cancel_mine(request: gr.Request):
        app.cancel(_session(request))

    cancel.click(cancel_mine, queue=False, api_visibility="private")

    model_field = fields[[i.key for i in form.ordered].index("model")]

    def switch_model(model, *values_and_shown):
        *values, old = values_and_shown
        try:
            return [*form.switch(values, old, model), model or form.model]
        except UserError as e:  # a preset that does not load: say so, and leave the form as it is
            raise gr.Error(str(e)) from None

    model_field.input(switch_model, inputs=[model_field, *fields, shown_model], outputs=[*fields, shown_model],
                      api_visibility="private", queue=False)
    return {"prompt": prompt, "fields": fields, "shown_model": shown_model}  # what Run again fills


def _runs_tab(app: App, tabs: gr.Tabs, parts: dict[str, dict]) -> None:
    """The gallery of past runs; opening one shows its outputs and config, with Run again and Resume."""
    with gr.Tab("Runs", id="tab-runs", elem_id="runs-tab"):
        refresh = gr.Button("Refresh")
        gallery = gr.Gallery(label="runs, newest first", columns=4, allow_preview=False, elem_id="runs-gallery")
        with gr.Row():
            with gr.Column():
                title = gr.Markdown()
                config_text = gr.Code(label="config.yaml", language="yaml", interactive=False, max_lines=24)
            with gr.Column():
                images = gr.Gallery(label="images", columns=2, visible=False)
                model = gr.Model3D(label="mesh.glb", height=360, elem_id="runs-viewer")  # hidden, it never draws
                video = gr.Video(label="video", visible=False)
                files = gr.File(label="files", file_count="multiple", visible=False)
                with gr.Row():
                    again = gr.Button("Run again", visible=False)
                    resume = gr.Button("Resume", visible=False, variant="primary")
        listed, chosen = gr.State([]), gr.State(None)  # inside the tab: a State loose in gr.Tabs breaks its tab bar

    def refreshed():
        runs = app.runs()
        items = [(app.thumbnail(r) or app.blank, f"{r['job']} · {r['prompt']} · {r['model']} · "
                  f"{datetime.fromtimestamp(r['time']):%Y-%m-%d %H:%M}" + ("" if r["finished"] else " · unfinished"))
                 for r in runs]
        return items, [{**r, "path": str(r["path"])} for r in runs]

    def opened(runs, evt: gr.SelectData):
        run = runs[evt.index]
        path, job = Path(run["path"]), run["job"]
        try:
            text = (path / "config.yaml").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise gr.Error(f"{path} cannot be read any more; press Refresh") from None
        found = outputs_of(job, path)
        clip = found["video"] or found["turntable"]  # a 4d run's front video
        heading = (f"### {_markdown(run['prompt'])}\n{job} · {_markdown(run['model'])} · {_markdown(str(path))}"
                   + ("" if run["finished"] else " · unfinished"))
        return (heading, text,
                gr.update(value=found["images"], visible=bool(found["images"])),
                gr.update(value=clip, visible=bool(clip)),
                found["model"],
                gr.update(value=found["files"] or None, visible=bool(found["files"])),
                gr.update(visible=True), gr.update(visible=job in RESUMABLE and not run["finished"]), run)

    # Run again fills the run's own tab: every tab's prompt, fields and shown model are outputs, the others unchanged.
    targets = [c for part in parts.values() for c in (part["prompt"], *part["fields"], part["shown_model"])]

    def run_again(run):
        if run is None:
            raise gr.Error("Open a run first.")
        try:
            saved = yaml.safe_load(Path(run["path"], "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        if not isinstance(saved, dict):
            raise gr.Error(f"{run['path']}/config.yaml cannot be read any more; press Refresh")
        values = []
        for job, part in parts.items():
            form = app.forms[job]
            if job == run["job"]:
                values += [saved.get("prompt", ""), *form.shown_config(saved), saved.get("model", form.model)]
            else:
                values += [gr.update()] * (len(part["fields"]) + 2)
        return [gr.Tabs(selected=next(f"tab-{t.name}" for t in TABS if t.job == run["job"])), *values]

    def resumed(run, progress=gr.Progress(), request: gr.Request = None):
        found = outputs_of(run["job"], app.resume(Path(run["path"]), progress, _session(request), run["job"]))
        return (gr.update(value=found["turntable"] or found["video"], visible=True), gr.update(value=found["model"], visible=True),
                gr.update(value=found["files"], visible=True), gr.update(visible=False))

    private = {"api_visibility": "private"}
    refresh.click(refreshed, outputs=[gallery, listed], queue=False, **private)
    tabs.select(refreshed, outputs=[gallery, listed], queue=False, **private)
    gallery.select(opened, inputs=[listed], outputs=[title, config_text, images, video, model, files, again, resume,
                                                     chosen], queue=False, **private)
    again.click(run_again, inputs=[chosen], outputs=[tabs, *targets], queue=False, **private)
    resume.click(resumed, inputs=[chosen], outputs=[video, model, files, resume], concurrency_limit=1,
                 concurrency_id="jobs", **private)


def build(app: App) -> gr.Blocks:
    with gr.Blocks(title="text2world") as demo:
        gr.Markdown("## text2world\nText to image, video and 3D from one latent-diffusion prior. Every option is the "
                    "CLI's (`python run.py JOB --help`); runs are written under the output folder, each with an "
                    "index.html.")
        with gr.Tabs() as tabs:
            parts = {t.job: _tab(app, t) for t in TABS}
            _runs_tab(app, tabs, parts)
    return demo


def main(cfg: UIConfig, out: str | Path = "outputs", progress: bool = True) -> None:
    make_output_dir(Path(out))
    app = App(out, progress)
    demo = build(app)
    demo.queue(default_concurrency_limit=1)
    logger.info("serving on http://%s:%d (outputs in %s)", cfg.host, cfg.port, Path(out).resolve())
    try:
        demo.launch(**launch_options(out), server_name=cfg.host, server_port=cfg.port, share=cfg.share)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise UserError(f"cannot serve on {cfg.host}:{cfg.port}: {e}; pick another with port=N") from None


def launch_options(out: str | Path) -> dict:
    """What every launch of the app passes: errors shown, the run folders servable, and no footer link to Gradio's
    own run history (the Runs tab is ours)."""
    served = [str((Path(out) / t.job).resolve()) for t in TABS]  # the jobs' run folders, not all of --out
    return {"show_error": True, "allowed_paths": served, "footer_links": ["api", "settings"]}
