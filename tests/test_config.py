"""Typed configs: presets, overrides, validation."""

from dataclasses import dataclass, field

import pytest

from pipelines.config import build, load, option, parse_overrides
from pipelines.errors import UserError
from pipelines.image import ImageConfig


@dataclass
class Camera:
    fov: float = option(40.0, "field of view")
    elevation: tuple[float, float] = option((-10.0, 80.0), "elevation range")


@dataclass
class Nested:
    steps: int = option(10, "steps")
    camera: Camera = field(default_factory=Camera)


def test_overrides_parse_types_and_nesting():
    assert parse_overrides(["steps=20", "guidance=5", "negative=low quality", "camera.fov=30", "x=[1, 2]"]) == {
        "steps": 20, "guidance": 5, "negative": "low quality", "camera": {"fov": 30}, "x": [1, 2]}


def test_nested_build_and_nearest_key():
    cfg = build(Nested, parse_overrides(["camera.fov=30", "camera.elevation=[0, 45]"]))
    assert cfg.camera.fov == 30.0 and cfg.camera.elevation == (0.0, 45.0)
    with pytest.raises(UserError, match=r"unknown config key 'camera.fvo': did you mean 'camera.fov'"):
        build(Nested, parse_overrides(["camera.fvo=30"]))


def test_presets_then_overrides():
    cfg = load(ImageConfig, "image", ["steps=3", "guidance=2", "seed=9", "model=sd15"])
    assert (cfg.steps, cfg.guidance, cfg.seed, cfg.model) == (3, 2.0, 9, "sd15")
    assert isinstance(cfg.guidance, float)
    assert load(ImageConfig, "image", ["guidance=5e-1"]).guidance == 0.5  # YAML 1.1 reads 5e-1 as a string
    assert load(ImageConfig, "image", []).sampler == "ddim"


@pytest.mark.parametrize("override, message", [
    ("steps=2.5", "must be an integer"),
    ("steps=true", "must be an integer"),
    ("allow_pickle=maybe", "must be true or false"),
    ("guidance=.nan", "guidance must be a finite number"),
    ("guidance=.inf", "guidance must be a finite number"),
    ("beta_schedule=quadratic", "unknown beta_schedule"),
    ("dtype=fp8", "unknown dtype"),
    ("height=-64", "height must be a positive"),
])
def test_type_and_range_errors(override, message):
    with pytest.raises(UserError, match=message):
        load(ImageConfig, "image", [override])


def test_config_file_layer(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("steps: 7\nguidance: 3\n")
    cfg = load(ImageConfig, "image", ["guidance=4"], config_file=str(f))
    assert (cfg.steps, cfg.guidance) == (7, 4.0)
    f.write_text("stepz: 7\n")
    with pytest.raises(UserError, match="did you mean 'steps'"):
        load(ImageConfig, "image", [], config_file=str(f))


def test_toyworld_preset_carries_its_own_3d_recipe_and_every_real_prior_gets_the_published_one(tmp_path):
    """configs/3d.yaml is the published SDS recipe: sd15, sd21-base, a local folder and a hub id all get it. The
    ToyWorld preset's `3d:` section overrides every key of it, then --config and key=value override both."""
    from dreamfusion.config import ThreeDConfig
    from dreamfusion.shading import TOYWORLD_LIGHT_OFFSET
    from pipelines import config

    toy = config.load(ThreeDConfig, "3d", [])
    sd = config.load(ThreeDConfig, "3d", ["model=sd15"])
    folder = config.load(ThreeDConfig, "3d", [f"model={tmp_path}"])  # any other model: a folder or hub id
    assert (toy.distance_range, toy.background, toy.encode_size, toy.steps) == ((3.2, 3.8), "fixed", None, 600)
    assert (sd.steps, sd.encode_size, sd.guidance, sd.background, sd.encoding) == (10000, 512, 100.0, "mlp", "hashgrid")
    assert (toy.albedo_network, sd.albedo_network) == ("shared", "separate")
    assert (toy.light_offset, sd.light_offset) == (TOYWORLD_LIGHT_OFFSET, (0.0, 0.0))  # ToyWorld's light; DreamFusion's
    assert (toy.refine_canvas, sd.refine_canvas) == ("plain", "fit")  # one-colour objects; textured ones keep theirs
    assert config.to_dict(folder) == {**config.to_dict(sd), "model": str(tmp_path)}
    assert config.to_dict(config.load(ThreeDConfig, "3d", ["model=sd21-base"])) == {**config.to_dict(sd), "model": "sd21-base"}
    sd_keys = set(config.preset("3d"))
    assert sd_keys <= set(config.model_defaults("toyworld", "3d"))  # nothing of the SD recipe leaks into ToyWorld's
    assert config.load(ThreeDConfig, "3d", ["model=sd15", "steps=7"]).steps == 7
    assert config.to_dict(config.job_defaults(ThreeDConfig, "3d")) == config.to_dict(toy)  # what --help shows
