"""The web app (`run.py ui`): forms generated from the configs, the API from gradio_client against a live app with
ToyWorld, Cancel and progress on a real 3D fit, a real browser (Debian's Chromium through Playwright), and the
offline index.html of every run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gradio as gr

import run
from pipelines import config
from pipelines.errors import UserError
from tests.tiny import probe
from ui.app import TABS, App, build, launch_options
from ui.form import COMMON, SKIP, Form

# ToyWorld, sized for a test: a few steps, tiny renders and exports.
TINY = {"image": {"steps": 3},
        "video": {"frames": 4, "steps": 3},
        "3d": {"steps": 4, "batch_size": 1, "render__resolution": 16, "render__samples_per_ray": 16,
               "export__mesh_resolution": 24, "export__turntable_frames": 3, "export__turntable_size": 16,
               "val_every": 2, "checkpoint_every": 2}}
TINY["4d"] = {**TINY["3d"], "val_every": 0, "dynamic__steps": 2, "dynamic__frames": 3, "dynamic__hidden": 8}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("UI_SCREENSHOTS")  # a folder to keep the browser test's screenshots in (docs/ui)


def form(job: str) -> Form:
    tab = next(t for t in TABS if t.job == job)
    return Form(tab.job, tab.cls, tab.section)


def values(f: Form, model: str | None = None, **changes) -> list:
    shown = f.defaults_for(model or f.model)
    for key, value in changes.items():
        shown[[i.key for i in f.ordered].index(key.replace("__", "."))] = value
    return shown


# ----------------------------------------------------------------------------------------------- forms
def test_tabs_are_run_py_jobs():
    for tab in TABS:
        job = run.JOBS[tab.job][None]
        assert (tab.cls, tab.module, tab.section) == (job.cls(), job.module, job.section)


@pytest.mark.parametrize("job", ["image", "video", "3d"])
def test_form_is_the_config(job):
    f = form(job)
    defaults = config.job_defaults(f.cls, f.section)
    assert [i.key for i in f.ordered] == [k for k in COMMON[job]] + [
        k for k in config.keys(f.cls) if k not in COMMON[job] and k not in SKIP]
    rows = {k: (v, h) for k, v, h in config.describe(defaults)}
    assert all(i.help == rows[i.key][1] for i in f.ordered)
    assert f.config(values(f)) == defaults  # the untouched form runs what a plain command runs
    # each option's shown default reads back as itself
    flat = config.flatten(config.to_dict(defaults))
    assert all(i.read(i.shown(flat[i.key])) == (list(flat[i.key]) if isinstance(flat[i.key], (list, tuple))
                                                else flat[i.key]) for i in f.ordered)


@pytest.mark.parametrize("job,change,cli", [
    ("image", {"steps": 0}, "steps=0"),
    ("image", {"sampler": "ddpmx"}, "sampler=ddpmx"),
    ("video", {"frames": 9999}, "frames=9999"),
    ("3d", {"export.formats": ["stl"]}, "export.formats=[stl]"),
    ("3d", {"camera.fov_range": "[50, 10]"}, "camera.fov_range=[50,10]"),
    ("3d", {"shading.light_offset": "[0.6"}, None),
])
def test_bad_values_fail_with_the_cli_message(job, change, cli):
    f = form(job)
    with pytest.raises(UserError) as form_error:
        f.config(values(f, **change))
    if cli is not None:
        with pytest.raises(UserError) as cli_error:
            config.load(f.cls, f.section, [cli])
        assert str(form_error.value) == str(cli_error.value)


def test_model_and_its_recipe():
    f = form("3d")
    sd15 = config.model_job_defaults(f.cls, f.section, "sd15")
    assert sd15.steps != config.job_defaults(f.cls, f.section).steps
    # An API call naming only the model gets that model's recipe, not the form's ToyWorld numbers.
    assert f.config(values(f, model="sd15")) == sd15
    # A form switched to sd15 shows sd15's defaults; a value typed there is kept, even one equal to ToyWorld's.
    typed = f.config(values(f, "sd15", steps=600), shown_model="sd15")
    assert typed == dataclasses.replace(sd15, steps=600)
    # Switching the model's dropdown: untouched options take the new model's defaults, changed ones stay.
    switched = f.switch(values(f, seed=5), "toyworld", "sd15")
    assert f.config(switched, shown_model="sd15") == dataclasses.replace(sd15, seed=5)


def test_run_again_refills_the_form(tiny_sd):
    f = form("3d")
    cfg = config.load(f.cls, f.section, [f"model={tiny_sd}", "steps=7", "field.encoding=frequency",
                                         "export.formats=[glb]", "shading.light_offset=[0.1,0.2]"])
    saved = {**config.to_dict(cfg), "prompt": "a red cube", "command": "run.py 3d ..."}
    assert f.config(f.shown_config(saved), shown_model=str(tiny_sd)) == cfg


# ------------------------------------------------------------------------------------ cancel, progress
def test_cancel_stops_a_fit_as_ctrl_c_does_and_it_resumes(tmp_path):
    app = App(tmp_path, progress=False)
    tab = next(t for t in TABS if t.job == "3d")
    f = app.forms["3d"]
    cfg = f.config(values(f, **{**TINY["3d"], "steps": 6}))
    seen = []

    def cancel_at_step_3(done, desc=""):
        seen.append((desc, done))
        if desc == "train 3d" and done[0] == 3:
            app.cancel()  # as the Cancel button, from this (the job's) thread; its next step raises

    with pytest.raises(gr.Error, match="Cancelled"):
        app.run_job(tab, cfg, "a red cube", cancel_at_step_3)
    [folder] = list((tmp_path / "3d").iterdir())
    assert (folder / "checkpoints").is_dir() and not (folder / "metadata.json").exists()
    assert ("train 3d", (3, 6)) in seen and not any(d == "turntable" for d, _ in seen)

    seen.clear()
    assert app.resume(folder, lambda done, desc="": seen.append((desc, done))) == folder  # the Runs tab's Resume
    assert (folder / "mesh.glb").is_file() and (folder / "index.html").is_file()
    steps = [done for desc, done in seen if desc == "train 3d"]
    assert steps[0] == (3, 6) and steps[-1] == (6, 6)  # continued from the checkpoint, not from 0
    assert ("turntable", (1, 1)) in seen and ("mesh turntable", (1, 1)) in seen  # export reports too


def test_a_job_waits_for_the_one_running(tmp_path):
    app = App(tmp_path, progress=False)
    tab = next(t for t in TABS if t.job == "image")
    cfg = app.forms["image"].config(values(app.forms["image"], steps=2))
    order = []
    with app.busy:  # a job running
        worker = threading.Thread(target=lambda: order.append(app.run_job(tab, cfg, "a red cube", lambda *a, **k: None)))
        worker.start()
        time.sleep(0.5)
        order.append("first done")
    worker.join(60)
    assert order[0] == "first done" and Path(order[1]).is_dir()


# ------------------------------------------------------------------------------------------ live app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The app on 127.0.0.1 with ToyWorld, serving outputs from a fresh folder; (url, out)."""
    out = tmp_path_factory.mktemp("ui-out")
    demo = build(App(out, progress=False))
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(**launch_options(out), server_name="127.0.0.1", server_port=free_port(),
                            prevent_thread_lock=True, quiet=True)
    yield url, out
    demo.close()


@pytest.fixture(scope="module")
def api_runs(live):
    """One run of each job through gradio_client: {job: (result, run folder)}."""
    from gradio_client import Client

    url, out = live
    client = Client(url, verbose=False)
    done = {}
    for job, prompt in (("image", "a red cube"), ("video", "a red ball moving right"), ("3d", "a red cube"),
                        ("4d", "a red ball moving right")):
        result = client.predict(prompt, **TINY[job], api_name=f"/generate_{job}")
        done[job] = (result, Path(result[-1]))
    return done


def test_api_returns_each_jobs_output(api_runs, live):
    _, out = live
    (gallery, _), image_run = api_runs["image"]
    assert Image.open(gallery[0]["image"]).format == "PNG" and image_run.parent == out / "image"
    (mp4, gif, _), video_run = api_runs["video"]
    info = probe(mp4)
    assert (info["codec"], info["frames"]) == ("h264", 4) and Image.open(gif).format == "GIF"
    (glb, turntable, files, _), run_3d = api_runs["3d"]
    import trimesh

    assert len(trimesh.load(glb, force="mesh").faces) > 0
    assert probe(turntable)["frames"] == 3 and sorted(Path(p).suffix for p in files) == [".glb", ".obj", ".ply"]
    (glb, video, orbit, files, _), run_4d = api_runs["4d"]
    from fourd.gltf import read_frames

    assert len(read_frames(glb)[1]) == 3 and probe(video)["frames"] == 3 and probe(orbit)["frames"] == 3
    assert sorted(Path(p).name for p in files) == ["frame_000.ply", "frame_001.ply", "frame_002.ply", "mesh.glb"]
    for folder in (image_run, video_run, run_3d, run_4d):
        assert (folder / "index.html").is_file() and (folder / "config.yaml").is_file()


def test_api_bad_value_is_an_error_and_writes_nothing(live, api_runs):
    from gradio_client import Client

    url, out = live
    before = sorted(out.rglob("*"))
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="steps must be at least 1, got 0"):
        client.predict("a red cube", steps=0, api_name="/generate_image")
    with pytest.raises(Exception, match="export.mesh_resolution must be at least 8, got 4"):
        client.predict("a red cube", export__mesh_resolution=4, api_name="/generate_3d")
    with pytest.raises(Exception, match="not in the list of choices"):  # Gradio's own check of a dropdown
        client.predict("a red cube", field__encoding="voxels", api_name="/generate_3d")
    with pytest.raises(Exception, match="the prompt is empty|The prompt is empty"):
        client.predict("  ", api_name="/generate_image")
    assert sorted(out.rglob("*")) == before


# --------------------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium executable (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        yield chromium
        chromium.close()


def shot(page, tmp: Path, name: str) -> None:
    for folder in filter(None, (tmp, SHOTS)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"ui_{name}.png"), full_page=True)


def not_blank(png: bytes) -> bool:
    """More than one colour over a tenth of the picture: something is drawn."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    background = np.median(pixels, axis=0)
    return (np.abs(pixels.astype(int) - background).sum(1) > 30).mean() > 0.02


def test_browser_generates_and_shows_the_3d_viewer(browser, live, api_runs, tmp_path):
    url, _ = live
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.fill("#image-prompt textarea", "a blue sphere")
    page.click("#image-generate")
    image = page.wait_for_selector("#image-gallery img", timeout=120_000)
    assert image.get_attribute("src")
    shot(page, tmp_path, "image")
    page.click("#video-tab-button")
    page.wait_for_selector("#video-prompt textarea")
    shot(page, tmp_path, "video")

    # Runs: the 3D run made through the API; Run again fills the 3D form with its (tiny) config; Generate.
    page.click("#runs-tab-button")
    page.click('#runs-gallery button.thumbnail-item:has(img[alt^="3d · a red cube"])')  # the API's 3D run
    page.get_by_role("button", name="Run again").click()
    page.wait_for_selector("#threed-prompt textarea")
    assert page.input_value("#threed-prompt textarea") == "a red cube"
    page.click("#threed-generate")
    canvas = page.wait_for_selector("#threed-viewer canvas", timeout=180_000)
    deadline = time.monotonic() + 60  # the GLB loads, then software WebGL draws it
    while not not_blank(canvas.screenshot()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not_blank(canvas.screenshot())
    shot(page, tmp_path, "3d")
    page.click("#runs-tab-button")
    page.wait_for_selector("#runs-gallery img")
    shot(page, tmp_path, "runs")
    page.close()


def test_index_html_plays_offline(browser, api_runs):
    for job in ("image", "video", "3d", "4d"):
        folder = api_runs[job][1]
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((folder / "index.html").as_uri())
        assert page.title()
        if job == "video":
            playing = page.evaluate("""async () => {
                const v = document.querySelector('video'); await v.play();
                await new Promise(r => setTimeout(r, 600)); return [v.currentTime, v.error]; }""")
            assert playing[0] > 0 and playing[1] is None
        if job == "image":
            assert page.evaluate("document.querySelector('img').naturalWidth") > 0
        if job == "3d":
            assert page.locator("a[download]").count() == 3
        if job == "4d":  # the animated GLB and each frame's PLY
            assert page.locator("a[download]").count() == 4
        assert requests and all(u.startswith("file://") for u in requests), requests
        page.close()


# ---------------------------------------------------------------------------------------- index.html
def test_bars_report_and_stop_even_when_not_drawn():
    from pipelines.progress import Bar, Cancelled, watch

    stop, seen = threading.Event(), []

    def report(desc, done, total):
        seen.append((desc, done, total))
        if done == 2:
            stop.set()

    ran = []
    with watch(report, stop), pytest.raises(Cancelled):
        for i in Bar(range(5), desc="steps", disable=True):
            ran.append(i)
    assert seen == [("steps", 0, 5), ("steps", 1, 5), ("steps", 2, 5)] and ran == [0, 1]
    assert list(Bar(range(3), desc="steps", disable=True)) == [0, 1, 2]  # outside `watch`: no hooks, no stop
    assert len(seen) == 3


def test_every_run_folder_has_its_page(tiny_3d_runs, tmp_path):
    finished, stopped = (shutil.copytree(p, tmp_path / w / p.name) for p, w in zip(tiny_3d_runs, ("f", "s")))
    page = (finished / "index.html").read_text()
    for name in ("turntable.mp4", "mesh_turntable.mp4", "mesh.glb", "mesh.obj", "mesh.ply", "val/step_000002.png",
                 "a red cube"):
        assert name in page, name
    assert "has not finished" not in page
    # A run stopped by Ctrl-C keeps its folder to resume from, and its page says so.
    assert "has not finished" in (stopped / "index.html").read_text()
    # A re-export gets a page of its own, and the run's page links it.
    assert run.main(["export", str(finished), "turntable_frames=2", "turntable_size=16", "mesh_resolution=16",
                     "--quiet"]) == 0
    [export] = [p for p in finished.iterdir() if p.name.startswith("export-")]
    assert (export / "index.html").is_file() and f"{export.name}/index.html" in (finished / "index.html").read_text()


def test_cancel_is_the_pressing_sessions_and_reaches_a_waiting_job(tmp_path):
    app = App(tmp_path, progress=False)
    tab = next(t for t in TABS if t.job == "image")
    cfg = app.forms["image"].config(values(app.forms["image"], steps=2))
    app.running = "other"  # another session's job runs: my Cancel leaves it alone
    app.cancel("mine")
    assert not app.stop.is_set()
    app.running = None
    with pytest.raises(gr.Error, match="before it started"):  # my waiting job saw my Cancel
        app.run_job(tab, cfg, "a red cube", lambda *a, **k: None, session="mine")
    assert not (tmp_path / "image").exists()
    assert app.run_job(tab, cfg, "a red cube", lambda *a, **k: None, session="mine").is_dir()  # the next one runs


def test_optional_switches_and_whole_numbers_are_read_strictly():
    f = form("image")
    with pytest.raises(UserError, match="channels_last"):
        f.config(values(f, channels_last="yes"))
    assert f.config(values(f, channels_last="false")).channels_last is False
    with pytest.raises(UserError, match="must be an integer"):
        f.config(values(f, steps=2.5))
    assert f.config(values(f, steps=3.0)).steps == 3
