"""Typed configs: dataclass defaults, model presets, `--config FILE` and `key=value`, validated once.

Every job has a dataclass whose fields are its options, nested by component (`field.bound=1.2`); each
field's help is the line `run.py JOB --help` prints. The dataclass defaults are the one source of
defaults; a model preset (configs/models/NAME.yaml) holds only what differs for that model. Layers
merge as plain dicts and `build` converts them once, rejecting unknown keys (naming the nearest one)
and values of the wrong type. This module imports nothing heavy, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError, not_a_file

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def option(default: Any, help: str, choices: tuple | None = None, **kwargs) -> Any:
    """A dataclass field with a one-line help string (shown by --help) and, for a string or a list of strings, the
    values it may take (`check_choices`, from the config's `validate`; the web form makes them a dropdown)."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def group(cls: type, help: str) -> Any:
    """A nested group of options (`field.`, `camera.`, ...), its defaults those of `cls`."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise not_a_file(f"config file {path}", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value")
    return data


def parse_overrides(items: list[str]) -> dict:
    """`["steps=20", "camera.fov=40"]` -> nested dict, values parsed as YAML scalars."""
    flat = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"cannot read override '{item}': write it as key=value")
        try:
            flat[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            flat[key] = raw
    return unflatten(flat)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type, data: dict, where: str = ""):
    """Convert a nested dict into the dataclass `cls`, checking every key (`where` names their source) and type."""
    _check_keys(cls, data, where)
    return _build(cls, data, "")


def _build(cls: type, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(value, hints[key], prefix + key) for key, value in data.items()})


def check_choices(cfg, prefix: str = "") -> None:
    """Each option of config `cfg` (not of its nested groups, which check their own) that declares `choices` holds
    one of them, or, for a list, only them. Configs call it from `validate`; `prefix` names their group."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if choices and item is not None and item not in choices:
                raise UserError(f"unknown {prefix}{f.name} '{item}': choose one of {', '.join(map(str, choices))}")


def keys(cls: type, prefix: str = "") -> list[str]:
    """Every option of a config class as a dotted key (`steps`, `field.bound`, ...)."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += keys(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def _check_keys(cls: type, data: dict, where: str = "") -> None:
    """Unknown dotted keys, with the nearest valid key over every group (`mesh_resolution` -> `export.mesh_resolution`)."""
    valid = keys(cls)
    groups = {k.rpartition(".")[0] for k in valid}
    for key in flatten(data):
        if key not in valid and key not in groups:
            raise UserError(f"{where}{_unknown_key(key, valid)}")


def _unknown_key(key: str, valid: list[str]) -> str:
    """The message for an unknown key: the same name in another group, else the closest key or name."""
    leaf = key.rpartition(".")[2]
    leaves = {k.rpartition(".")[2]: k for k in valid}
    near = [k for k in valid if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    near = near or [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)]
    scope = key.rpartition(".")[0]
    local = sorted(k for k in valid if k.rpartition(".")[0] == scope) or valid
    hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(local)}"
    return f"unknown config key '{key}': {hint}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a type hint (int, float, bool, str, Optional, tuple, dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            names = [f"{key}.{f.name}" for f in dataclasses.fields(tp)]
            raise UserError(f"config key '{key}' is a group of options ({', '.join(names[:4])}, ...): set one as "
                            f"{key}.NAME=VALUE")
        return _build(tp, value, prefix=key + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list like [a, b], got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, key) for v in value) if origin is tuple else [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(number):  # no option means anything at nan or inf
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def describe(cfg, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, value, help) rows for every option of a config instance, nested groups flattened with dots."""
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, prefix + f.name + ".")
            continue
        rows.append((prefix + f.name, repr(value) if isinstance(value, str) else _shown(value), f.metadata.get("help", "")))
    return rows


def _shown(value: Any) -> str:
    """A default as it is typed: lists and tuples as [a, b] (a tuple's "(a, b)" would be refused on the command line)."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def flatten(data: dict, prefix: str = "") -> dict:
    """{"field": {"bound": 1.2}} -> {"field.bound": 1.2} (lists stay values)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat: dict) -> dict:
    """flatten's inverse."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"'{key}' sets a field of '{p}', which is given a value of its own too")
        node[leaf] = value
    return out


def changed(cfg, defaults) -> dict:
    """The options (dotted keys) in which config `cfg` differs from config `defaults`: what a command chose."""
    base = flatten(to_dict(defaults))
    return {k: v for k, v in flatten(to_dict(cfg)).items() if v != base.get(k)}


# ------------------------------------------------------------------------------------- model presets
@dataclass
class ModelPreset:
    """configs/models/NAME.yaml: where the weights are, the shipped motion modules, and per-job defaults."""

    name: str
    path: Optional[str] = None  # a folder, relative to the repository
    id: Optional[str] = None  # or a hub id
    revision: Optional[str] = None
    motion: Optional[str] = None  # temporal layers the video job loads by default
    interpolation: Optional[str] = None  # the masked-frame model for interpolate= and image=
    jobs: dict = dataclasses.field(default_factory=dict)  # section -> options that differ for this model


PRESET_KEYS = ("path", "id", "revision", "motion", "interpolation")
PRESET_SECTIONS = ("3d", "4d")  # jobs whose defaults a model preset may change


def model_presets() -> dict[str, ModelPreset]:
    return {p.stem: _read_preset(p) for p in sorted((CONFIG_DIR / "models").glob("*.yaml"))}


def model_preset(name: str) -> ModelPreset | None:
    path = CONFIG_DIR / "models" / f"{name}.yaml"
    return _read_preset(path) if path.is_file() else None


def _read_preset(path: Path) -> ModelPreset:
    data = load_yaml(path)
    unknown = [k for k in data if k not in PRESET_KEYS + PRESET_SECTIONS]
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}' (a model preset holds {', '.join(PRESET_KEYS)} and "
                        f"per-job sections {', '.join(PRESET_SECTIONS)})")
    if ("path" in data) == ("id" in data):
        raise UserError(f"{path}: give the weights as exactly one of path: (a folder) or id: (a hub id)")
    jobs = {k: data[k] for k in PRESET_SECTIONS if k in data}
    for section, options in jobs.items():
        if not isinstance(options, dict):
            raise UserError(f"{path}: the '{section}:' section must map option names to values")
    return ModelPreset(name=path.stem, jobs=jobs, **{k: (None if data.get(k) is None else str(data[k]))
                                                      for k in PRESET_KEYS})


def model_defaults(model: str, section: str | None) -> dict:
    """A model preset's own defaults for a job (its `<section>:`), e.g. ToyWorld's 3D recipe."""
    preset = model_preset(model) if section else None
    return preset.jobs.get(section, {}) if preset else {}


def _layers(cls: type, section: str | None, user: dict) -> dict:
    """The model preset's section for the model the user names (or the default model) <- `user`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "model" not in fields:
        return user
    model = str(user.get("model", fields["model"].default))
    preset = model_defaults(model, section)
    _check_keys(cls, preset, f"configs/models/{model}.yaml, section '{section}:': ")
    return merge(preset, user)


def job_defaults(cls: type, section: str | None = None):
    """The options a plain `run.py JOB` runs with: the dataclass defaults and the default model's section."""
    return build(cls, _layers(cls, section, {}))


def model_job_defaults(cls: type, section: str | None, model: str):
    """The options `run.py JOB model=MODEL` runs with: the dataclass defaults and that model's section."""
    return build(cls, _layers(cls, section, {"model": model}))


def from_dict(cls: type, section: str | None, user: dict):
    """Dataclass defaults <- the model preset's section <- `user` (nested), validated."""
    cfg = build(cls, _layers(cls, section, user))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load(cls: type, section: str | None, overrides: list[str], config_file: str | None = None):
    """Dataclass defaults <- the model preset's section <- --config FILE <- key=value overrides."""
    user = load_yaml(config_file) if config_file else {}
    return from_dict(cls, section, merge(user, parse_overrides(overrides)))
