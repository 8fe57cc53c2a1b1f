"""Typed configs: dataclass defaults, model presets, overrides, validation."""

from dataclasses import dataclass, field, fields, is_dataclass

import pytest

from pipelines.config import build, load, option, parse_overrides
from pipelines.errors import UserError
from pipelines.options import ImageConfig


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
    cfg = load(ImageConfig, None, ["steps=3", "guidance=2", "seed=9", "model=sd15"])
    assert (cfg.steps, cfg.guidance, cfg.seed, cfg.model) == (3, 2.0, 9, "sd15")
    assert isinstance(cfg.guidance, float)
    assert load(ImageConfig, None, ["guidance=5e-1"]).guidance == 0.5  # YAML 1.1 reads 5e-1 as a string
    assert load(ImageConfig, None, []).sampler == "ddim"


@pytest.mark.parametrize("override, message", [
    ("steps=2.5", "must be an integer"),
    ("steps=true", "must be an integer"),
    ("allow_pickle=maybe", "must be true or false"),
    ("guidance=.nan", "'guidance' must be a finite number"),
    ("guidance=.inf", "'guidance' must be a finite number"),
    ("beta_schedule=quadratic", "unknown beta_schedule"),
    ("dtype=fp8", "unknown dtype"),
    ("height=-64", "height must be a positive"),
])
def test_type_and_range_errors(override, message):
    with pytest.raises(UserError, match=message):
        load(ImageConfig, None, [override])


def test_config_file_layer(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("steps: 7\nguidance: 3\n")
    cfg = load(ImageConfig, None, ["guidance=4"], config_file=str(f))
    assert (cfg.steps, cfg.guidance) == (7, 4.0)
    f.write_text("stepz: 7\n")
    with pytest.raises(UserError, match="did you mean 'steps'"):
        load(ImageConfig, None, [], config_file=str(f))


def test_toyworld_preset_holds_only_its_differences_and_every_real_prior_gets_the_dataclass_defaults(tmp_path):
    """The dataclass defaults are the published SDS recipe: sd15, sd21-base, a local folder and a hub id all get
    it. The ToyWorld preset's `3d:` section changes only what differs, then --config and key=value override both."""
    from dreamfusion.config import ThreeDConfig
    from pipelines import config

    toy = config.load(ThreeDConfig, "3d", [])
    sd = config.load(ThreeDConfig, "3d", ["model=sd15"])
    folder = config.load(ThreeDConfig, "3d", [f"model={tmp_path}"])  # any other model: a folder or hub id
    assert (toy.camera.distance_range, toy.field.background, toy.guidance.encode_size, toy.steps) == (
        (3.2, 3.8), "fixed", None, 600)
    assert (sd.steps, sd.guidance.encode_size, sd.guidance.scale, sd.field.background, sd.field.encoding) == (
        10000, 512, 100.0, "mlp", "hashgrid")
    assert (toy.field.albedo_network, sd.field.albedo_network) == ("shared", "separate")
    assert (toy.shading.light_offset, sd.shading.light_offset) == ((0.6, -0.4), (0.0, 0.0))  # ToyWorld's light; DreamFusion's
    assert config.to_dict(sd) == {**config.to_dict(ThreeDConfig()), "model": "sd15"}  # the defaults are the SD recipe
    assert config.to_dict(folder) == {**config.to_dict(sd), "model": str(tmp_path)}
    assert config.to_dict(config.load(ThreeDConfig, "3d", ["model=sd21-base"])) == {**config.to_dict(sd), "model": "sd21-base"}
    defaults = config.flatten(config.to_dict(ThreeDConfig()))
    section = config.flatten(config.model_defaults("toyworld", "3d"))
    assert section and all(defaults[k] != v for k, v in section.items())  # only what differs, every key a real option
    assert config.load(ThreeDConfig, "3d", ["model=sd15", "steps=7"]).steps == 7
    assert config.to_dict(config.job_defaults(ThreeDConfig, "3d")) == config.to_dict(toy)  # what --help shows


def test_3d_parts_get_their_own_groups():
    """Every 3D part's options sit in its own group, and each group is a dataclass that validates itself."""
    from dreamfusion.config import ThreeDConfig

    cfg = ThreeDConfig()
    groups = [f.name for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))]
    assert groups == ["field", "camera", "shading", "render", "guidance", "loss", "export"]
    for name in groups:
        assert callable(getattr(getattr(cfg, name), "validate"))
    with pytest.raises(UserError, match="field.bound must be positive"):
        load(ThreeDConfig, "3d", ["field.bound=0"])
    with pytest.raises(UserError, match="is a group of options"):
        load(ThreeDConfig, "3d", ["field=3"])


def test_model_presets_are_typed(tmp_path, monkeypatch):
    """A model preset holds weights, motion folders and per-job sections, nothing else; a typo is named."""
    from pipelines import config

    presets = config.model_presets()
    assert presets["toyworld"].path == "models/toyworld" and presets["toyworld"].motion == "models/toyworld-motion"
    assert presets["sd15"].id and presets["sd15"].path is None and "3d" not in presets["sd15"].jobs
    assert presets["sd15"].motion == "guoyww/animatediff-motion-adapter-v1-5-2"  # SD + AnimateDiff for video and 4d
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text("path: somewhere\nmotoin: x\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(UserError, match="unknown key 'motoin'"):
        config.model_preset("mine")
    (tmp_path / "models" / "mine.yaml").write_text("path: somewhere\n3d:\n  field:\n    bnd: 1.0\n")
    from dreamfusion.config import ThreeDConfig

    with pytest.raises(UserError, match=r"configs/models/mine.yaml, section '3d:': unknown config key 'field.bnd': "
                                        r"did you mean 'field.bound'"):
        config.load(ThreeDConfig, "3d", ["model=mine"])
