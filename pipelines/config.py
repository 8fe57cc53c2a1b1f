"""Typed configs: dataclass schemas, YAML presets and `key=value` overrides, validated once.

Every job has a dataclass whose fields are its options; each field's `metadata["help"]` is the
one-line meaning that `run.py JOB --help` prints. Presets (YAML) and CLI overrides are merged
as plain dicts and converted *once* by `build()`, which rejects unknown keys (naming the nearest
valid one) and values of the wrong type. Modules only ever see the typed object.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def option(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a one-line help string (shown by --help)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value")
    return data


def parse_overrides(items: list[str]) -> dict:
    """`["steps=20", "camera.fov=40"]` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"cannot read override '{item}': write it as key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type, data: dict, prefix: str = ""):
    """Convert a nested dict into the dataclass `cls`, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(_unknown_key(prefix + key, list(fields), prefix))
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _unknown_key(key: str, valid: list[str], prefix: str) -> str:
    leaf = key[len(prefix):]
    near = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid keys: {', '.join(sorted(valid))}"
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
            raise UserError(f"config key '{key}' is a group of options; set its fields as {key}.NAME=VALUE")
        return build(tp, value, prefix=key + ".")
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
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
        rows.append((prefix + f.name, repr(value) if isinstance(value, str) else str(value), f.metadata.get("help", "")))
    return rows


def preset(job: str) -> dict:
    """configs/<job>.yaml as a dict (empty when the job has no preset file)."""
    path = CONFIG_DIR / f"{job}.yaml"
    return load_yaml(path) if path.is_file() else {}


def model_defaults(model: str, job: str) -> dict:
    """A model preset's own defaults for a job: the `<job>:` section of configs/models/<model>.yaml (so
    `python run.py 3d PROMPT model=sd21-base` follows the published SD recipe, not ToyWorld's)."""
    path = CONFIG_DIR / "models" / f"{model}.yaml"
    section = load_yaml(path).get(job) if path.is_file() else None
    if section is not None and not isinstance(section, dict):
        raise UserError(f"{path}: the '{job}:' section must map option names to values")
    return section or {}


def _layers(cls: type, job: str, user: dict) -> dict:
    """Dataclass defaults <- configs/<job>.yaml <- the model preset's `<job>:` section <- `user`."""
    data = preset(job)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "model" in fields:
        default = fields["model"].default
        data = merge(data, model_defaults(str(user.get("model", data.get("model", default))), job))
    return merge(data, user)


def job_defaults(cls: type, job: str):
    """The options a plain `run.py JOB` runs with (the default model's recipe included): what `--help`
    shows, and what a resumed run compares the command's options against to see which ones it changed."""
    return build(cls, _layers(cls, job, {}))


def load(cls: type, job: str, overrides: list[str], config_file: str | None = None):
    """Dataclass defaults <- configs/<job>.yaml <- the model preset's `<job>:` section <- --config FILE
    <- key=value overrides."""
    user = load_yaml(config_file) if config_file else {}
    cfg = build(cls, _layers(cls, job, merge(user, parse_overrides(overrides))))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
