"""Checkpoints: resume is exact for every trainer, no load unpickles, and a kill mid-save leaves a checkpoint that
resumes exactly or is refused with one line."""

import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipelines.training
import run

TINY_TEMPORAL = ["frames=3", "bank_size=6", "batch_size=2", "steps=4", "checkpoint_every=2", "warmup_steps=1",
                 "device=cpu", "--quiet"]
TINY_PRIOR = ["arch.image_size=16", "arch.vae_channels=[16, 16]", "arch.unet_channels=[32, 32, 32]", "arch.text_width=32",
              "arch.text_layers=1", "bank_size=32", "batch_size=4", "warmup_steps=1", "device=cpu", "vae_steps=2",
              "unet_steps=4", "checkpoint_every=2", "ema_decay=0.9", "--quiet"]


@contextmanager
def interrupted_at(stop: int, stage: str):
    """Ctrl-C in the optimisation loop of `stage` at its step `stop` (after the earlier steps' checkpoints)."""
    one_step = pipelines.training._one_step

    def step(accel, st, *args):
        if st.name == stage and args[-3] == stop:  # (model, opt, batch_fn, cfg, params, ema, step, warmup, began)
            raise KeyboardInterrupt
        return one_step(accel, st, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines.training, "_one_step", step)
        yield


def only_run(out: Path, job: str) -> Path:
    [d] = [p for p in (out / job).iterdir() if p.is_dir()]
    return d


@pytest.fixture(scope="module")
def fits(tiny_3d_runs):
    """A straight tiny 3d fit's asset, and a fit of the same stopped by Ctrl-C at step 3 (a template to copy)."""
    finished, stopped = tiny_3d_runs
    return load_file(finished / "asset.safetensors"), stopped


@pytest.fixture(scope="module")
def stopped_temporal(tiny_sd, tmp_path_factory):
    """A tiny train temporal run stopped by Ctrl-C at step 3 (a template to copy)."""
    out = tmp_path_factory.mktemp("temporal")
    with interrupted_at(3, "temporal"):
        assert run.main(["train", "temporal", f"model={tiny_sd}", *TINY_TEMPORAL, "--out", str(out)]) == 130
    return only_run(out, "train")


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.parent.name / run_dir.name))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


TRAINERS = {  # what: (argv, the stage to stop, the file of trained weights, relative to the run folder)
    "temporal": (TINY_TEMPORAL, "temporal", "motion/temporal_layers.safetensors"),
    "prior": (TINY_PRIOR, "unet", "model/unet/diffusion_pytorch_model.safetensors"),
}


@pytest.mark.parametrize("what", list(TRAINERS))
def test_resume_is_exact_for_the_trainers(what, tiny_sd, tmp_path):
    """Optimizer state, EMA and the loss log come back from the checkpoint: a stopped and resumed run ends
    where an uninterrupted one does."""
    argv, stage, weights = TRAINERS[what]
    model = [f"model={tiny_sd}"] if what == "temporal" else []
    assert run.main(["train", what, *model, *argv, "--out", str(tmp_path / "straight")]) == 0
    straight = only_run(tmp_path / "straight", "train")
    with interrupted_at(3, stage):
        assert run.main(["train", what, *model, *argv, "--out", str(tmp_path / "stopped")]) == 130
    stopped = only_run(tmp_path / "stopped", "train")
    assert json.loads((stopped / "checkpoints" / stage / "progress.json").read_text())["step"] == 3
    assert run.main(["train", what, f"resume={stopped}", "--quiet"]) == 0
    assert_same(load_file(straight / weights), load_file(stopped / weights))
    log = lambda d: json.loads((d / "losses.json").read_text())  # noqa: E731
    assert log(stopped) == log(straight)  # the history from before the stop is kept


class Planted:
    """A pickle that, when loaded, writes a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_resume_never_unpickles(stopped_temporal, tmp_path, monkeypatch):
    """Pickles planted wherever Accelerate kept state (EMA, optimizer, RNG, scheduler, model) are never loaded."""
    d = copy_of(stopped_temporal, tmp_path)
    marker = tmp_path / "pwned"
    for folder in (d, d / "checkpoints", d / "checkpoints" / "temporal"):
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                     "pytorch_model.bin", "ema.pkl"):
            (folder / name).write_bytes(pickle.dumps(Planted(marker)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on resume"))
    assert run.main(["train", "temporal", f"resume={d}", "--quiet"]) == 0
    assert not marker.exists()
    # the planted pickle does run code when loaded, so the check above means something
    pickle.loads((d / "ema.pkl").read_bytes())
    assert marker.read_text() == "code ran"


def test_a_checkpoint_in_accelerates_pickle_format_is_refused(stopped_temporal, tmp_path, capsys):
    d = copy_of(stopped_temporal, tmp_path)
    ckpt = d / "checkpoints" / "temporal"
    for name in ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "ema.safetensors", "ema.json"):
        (ckpt / name).unlink()
    (ckpt / "optimizer.bin").write_bytes(b"accelerate's pickle")
    capsys.readouterr()
    assert run.main(["train", "temporal", f"resume={d}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a complete checkpoint of this version (no optimizer.safetensors)" in err


def crash_states():
    """What a kill at some moment of save_checkpoint leaves (it writes .3d.tmp, renames 3d to .3d.old, renames
    .3d.tmp to 3d, removes .3d.old), made from a complete checkpoint `ckpt`."""

    def partial_tmp(ckpt):  # killed while writing the new one: the old one is whole
        tmp = ckpt.with_name(".3d.tmp")
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"half a file")

    def between_renames(ckpt):  # the old one moved aside, the new one not yet in place
        ckpt.rename(ckpt.with_name(".3d.old"))
        partial_tmp(ckpt)

    def before_cleanup(ckpt):  # the new one in place, the old one not yet removed
        shutil.copytree(ckpt, ckpt.with_name(".3d.old"))

    return {"partial_tmp": partial_tmp, "between_renames": between_renames, "before_cleanup": before_cleanup}


@pytest.mark.parametrize("state", list(crash_states()))
def test_a_kill_during_a_checkpoint_write_resumes_exactly(state, fits, tmp_path):
    """...and what the resume writes is readable like any output: weights and checkpoints get the umask's mode
    (0644 under umask 022), not safetensors' and mkstemp's 0600."""
    straight, stopped = fits
    d = copy_of(stopped, tmp_path)
    crash_states()[state](d / "checkpoints" / "3d")
    assert run.main(["3d", "--resume", str(d), "--quiet"]) == 0
    assert_same(straight, load_file(d / "asset.safetensors"))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["3d"]  # the next save cleaned up
    umask = os.umask(0)
    os.umask(umask)
    files = [d / "asset.safetensors", d / "mesh.glb", *(d / "checkpoints" / "3d").iterdir()]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}


def test_a_corrupt_checkpoint_is_refused_with_one_line(fits, tmp_path, capsys):
    d = copy_of(fits[1], tmp_path)
    model = d / "checkpoints" / "3d" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    capsys.readouterr()
    assert run.main(["3d", "--resume", str(d), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume from") and "\n" not in err
