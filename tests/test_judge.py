"""The ToyWorld judge and `run.py eval image`: the shipped judge on fresh renders, training it end to end,
the eval's numbers on known predictions, and the eval run directory on a tiny random-weight prior."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import run
from pipelines.prior import Prior
from evals.config import EvalImageConfig
from evals.image import Prompt, build_report, generate_all
from evals.judge import Judge, accuracy, augment, load_judge, render_set, save_judge
from toyworld.config import Architecture
from toyworld.model import build_components, save_model

ROOT = Path(__file__).resolve().parent.parent
FRESH_SEED = 4242  # neither the shipped judge's training seed (0) nor its held-out seed


def run_cli(*argv) -> int:
    return run.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny_toyworld(tmp_path_factory) -> Path:
    """A random-weight prior in the ToyWorld layout (word-level tokenizer, 64 px, VAE factor 4)."""
    torch.manual_seed(0)
    arch = Architecture(vae_channels=(16, 16, 16), unet_channels=(32, 32, 32), unet_layers=1, text_width=32, text_layers=1)
    return save_model(build_components(arch), tmp_path_factory.mktemp("models") / "tiny-toyworld", fp16=False)


@pytest.fixture(scope="module")
def random_judge(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_judge(Judge(), tmp_path_factory.mktemp("judges") / "judge")


@pytest.fixture(scope="module")
def fresh_renders():
    return render_set(256, FRESH_SEED)


# ------------------------------------------------------------------------------------ the shipped judge
def test_shipped_judge_names_colour_and_shape_of_fresh_renders(fresh_renders):
    judge = load_judge(ROOT / "models" / "judge")
    acc = accuracy(judge, *fresh_renders)
    assert acc["color"] >= 0.97 and acc["shape"] >= 0.95, acc
    assert acc["view"] >= 0.6, acc  # 4 classes, ambiguous near the boundaries: well above chance is the claim
    assert judge.metrics["accuracy"]["color"] >= 0.97  # what it recorded when it was trained


def test_shipped_judge_is_robust_to_blur_and_noise(fresh_renders):
    images, labels = fresh_renders
    augmented = augment(images.float() / 255, torch.Generator().manual_seed(1))
    acc = accuracy(load_judge(ROOT / "models" / "judge"), augmented, labels)
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.9, acc


def test_judge_resizes_other_image_sizes(fresh_renders):
    judge = load_judge(ROOT / "models" / "judge")
    images = fresh_renders[0][:16].float() / 255
    big = torch.nn.functional.interpolate(images, size=(128, 128), mode="bilinear", align_corners=False)
    scores = judge.scores(big)
    assert scores["color"].shape == (16, 8) and torch.allclose(scores["shape"].sum(-1), torch.ones(16), atol=1e-5)
    assert (judge.predict(big)["color"] == judge.predict(images)["color"]).float().mean() >= 0.9


# ------------------------------------------------------------------------------------------ training
def test_train_judge_end_to_end(tmp_path):
    installed = tmp_path / "installed"
    assert run_cli("train", "judge", "steps=3", "batch_size=8", "bank_size=16", "eval_size=8", f"save_to={installed}",
                   "--out", tmp_path / "out", "--quiet") == 0
    [run_dir] = (tmp_path / "out" / "train").iterdir()
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert set(meta["held_out"]["accuracy"]) == {"color", "shape", "view"} and meta["steps"] == 3
    assert {"render_s", "train_s", "total_s"} <= set(meta["wall_s"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "judge" / "README.md").is_file()
    judge = load_judge(installed)
    assert judge.metrics["steps"] == 3
    assert judge.predict(torch.rand(2, 3, 64, 64))["view"].shape == (2,)
    assert not list(tmp_path.glob(".installed*")), "install left a temp folder behind"


# ------------------------------------------------------------------------------------------ eval image
def test_report_numbers_on_known_predictions():
    prompts = [Prompt("a red cube", 0, 1), Prompt("a blue cube", 5, 1)]
    # Two samples each; the second blue cube is judged a purple sphere.
    predicted = {"color": torch.tensor([0, 0, 5, 6]), "shape": torch.tensor([1, 1, 1, 0]), "view": torch.zeros(4).long()}
    cfg = EvalImageConfig(samples_per_prompt=2, colors=("red", "blue"), shapes=("cube",))
    grid = build_report(prompts, cfg, predicted, {})["grid"]
    assert (grid["color_accuracy"], grid["shape_accuracy"], grid["both_accuracy"]) == (0.75, 0.75, 0.75)
    assert grid["per_color"]["blue"]["both_accuracy"] == 0.5 and grid["per_color"]["red"]["both_accuracy"] == 1.0
    assert grid["per_prompt"][1]["judged"] == ["a blue cube", "a purple sphere"]
    assert grid["confusion"]["color"]["prompted"] == ["red", "blue"]
    assert {(c["head"], c["prompted"], c["judged"]) for c in grid["confusion"]["top"]} == {
        ("color", "blue", "purple"), ("shape", "cube", "sphere")}


def test_eval_image_run_directory(tiny_toyworld, random_judge, tmp_path):
    assert run_cli("eval", "image", f"model={tiny_toyworld}", f"judge={random_judge}", "samples_per_prompt=1",
                   "steps=1", "colors=[blue, red]", "shapes=[cube, sphere]", "views=true", "device=cpu",
                   "--out", tmp_path, "--quiet") == 0
    [run_dir] = (tmp_path / "eval").iterdir()
    assert run_dir.name.endswith("-image")
    report = json.loads((run_dir / "report.json").read_text())
    grid, views = report["grid"], report["views"]
    assert grid["images"] == 4 and views["images"] == 16 and views["prompts"] == 16
    for key in ("color_accuracy", "shape_accuracy", "both_accuracy"):
        assert 0 <= grid[key] <= 1
    assert list(grid["per_color"]) == ["red", "blue"] and list(grid["per_shape"]) == ["sphere", "cube"]
    assert [p["prompt"] for p in grid["per_prompt"]] == ["a red sphere", "a blue sphere", "a red cube", "a blue cube"]
    assert 0 <= views["view_accuracy"] <= 1 and set(views["per_view"]) == {"front", "side", "back", "overhead"}
    assert "| all |" in (run_dir / "report.md").read_text()
    assert Image.open(run_dir / "grid.png").size[0] > 2 * 64
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["images"] == 20 and len(meta["judge_hash"]) == 64 and {"load", "generate", "judge"} <= set(meta["timings_s"])
    assert not list(run_dir.glob(".*")), "temp files left behind"


def test_eval_images_do_not_depend_on_batch_size(tiny_toyworld):
    prior = Prior.from_pretrained(str(tiny_toyworld))
    prompts = [Prompt("a red cube", 0, 1), Prompt("a blue ball", 5, 0)]
    one = generate_all(prior, prompts, EvalImageConfig(samples_per_prompt=2, steps=2, batch_size=1), progress=False)
    four = generate_all(prior, prompts, EvalImageConfig(samples_per_prompt=2, steps=2, batch_size=4), progress=False)
    assert one.shape == (4, 3, 64, 64)
    torch.testing.assert_close(one, four, atol=1e-4, rtol=0)
