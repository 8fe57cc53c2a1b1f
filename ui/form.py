"""A job's web form, generated from its config dataclass: the same names, defaults, help and choices as the CLI.

`inputs(cls)` lists one `Input` per option (dotted keys, as `key=value` takes them). The app makes a Gradio
component of each, and `Form.config` turns the submitted values back into the job's config through the same
`pipelines.config` code the CLI uses, so a bad value fails with the CLI's one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines import config
from pipelines.errors import UserError

# Shown above "Advanced", in this order; every other option goes under it. A test checks each names an option.
COMMON = {
    "image": ("negative", "model", "steps", "guidance", "seed", "num_images"),
    "video": ("negative", "model", "motion", "frames", "fps", "steps", "guidance", "seed"),
    "3d": ("negative", "model", "steps", "seed", "guidance.scale", "export.formats"),
    "4d": ("negative", "model", "motion", "steps", "dynamic.steps", "dynamic.guidance", "seed"),
}
SKIP = ("resume",)  # the Runs tab's Resume button continues a run
MOTIONS = ("guoyww/animatediff-motion-adapter-v1-5-2",)  # beside the model presets' own temporal layers
UNSET = "default"  # an optional true/false left to the job


@dataclass
class Input:
    """One option of a job's form."""

    key: str
    kind: str  # bool, int, float, str, list, or optional-bool
    optional: bool
    default: Any
    help: str
    choices: tuple = ()

    def shown(self, value: Any) -> Any:
        """A config value as its component shows it."""
        if self.kind == "optional-bool":
            return UNSET if value is None else str(bool(value)).lower()
        if self.kind == "list":
            return "" if value is None else (list(value) if self.choices else json.dumps(list(value)))
        if self.kind == "str":
            return "" if value is None else value
        return value

    def read(self, value: Any) -> Any:
        """A component's value as the config takes it (`pipelines.config.build` then checks its type and range)."""
        if self.kind == "optional-bool":
            if value in (None, UNSET) or isinstance(value, bool):
                return None if value == UNSET else value
            if str(value).lower() not in ("true", "false"):
                raise UserError(f"config key '{self.key}' must be {UNSET}, true or false, got {value!r}")
            return str(value).lower() == "true"
        if self.kind == "list" and not self.choices:
            if value is None or not str(value).strip():
                return None if self.optional else []
            try:
                return yaml.safe_load(str(value))
            except yaml.YAMLError:
                raise UserError(f"config key '{self.key}' must be a list like [a, b], got {value!r}") from None
        if self.kind == "str" and self.optional and (value is None or not str(value).strip()):
            return None
        if self.kind in ("int", "float") and value is None and not self.optional:
            raise UserError(f"config key '{self.key}' needs a value")
        if self.kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value


def _kind(hint: Any) -> tuple[str, bool]:
    """(kind, optional) of a type hint."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in typing.get_args(hint)
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (tuple, list):
        return "list", optional
    if hint is bool:
        return ("optional-bool" if optional else "bool"), optional
    return {int: "int", float: "float"}.get(hint, "str"), optional


def inputs(cls: type, defaults=None, prefix: str = "") -> list[Input]:
    """Every option of config class `cls` (nested groups flattened to dotted keys), with `defaults`' values."""
    defaults = defaults if defaults is not None else cls()
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += inputs(hints[f.name], value, prefix + f.name + ".")
        elif prefix + f.name not in SKIP:
            kind, optional = _kind(hints[f.name])
            out.append(Input(prefix + f.name, kind, optional, value, f.metadata.get("help", ""),
                             f.metadata.get("choices", ())))
    return out


def model_choices() -> list[str]:
    return list(config.model_presets())


def motion_choices() -> list:
    """(label, value) pairs: the model preset's own layers (blank), the presets' layers, known AnimateDiff adapters."""
    shipped = [p.motion for p in config.model_presets().values() if p.motion]
    return [("the model preset's", ""), *((m, m) for m in dict.fromkeys([*shipped, *MOTIONS]))]


class Form:
    """The options of one job (`section` as in run.py's Job: the model presets' section that sets its defaults)."""

    def __init__(self, job: str, cls: type, section: str | None):
        self.job, self.cls, self.section = job, cls, section
        defaults = config.job_defaults(cls, section)
        self.model = defaults.model  # the model a plain command uses
        self.inputs = inputs(cls, defaults)
        keys = [i.key for i in self.inputs]
        missing = [k for k in COMMON[job] if k not in keys]
        if missing:
            raise ValueError(f"COMMON names no option of {cls.__name__}: {missing}")
        order = {k: n for n, k in enumerate(COMMON[job])}
        self.common = sorted((i for i in self.inputs if i.key in order), key=lambda i: order[i.key])
        self.advanced = [i for i in self.inputs if i.key not in order]
        self.ordered = self.common + self.advanced  # the order of the app's inputs (and the API's parameters)

    def defaults_for(self, model: str) -> list:
        """Every input's shown value when the form is set to `model`'s defaults (its preset section)."""
        flat = config.flatten(config.to_dict(config.model_job_defaults(self.cls, self.section, model)))
        return [i.shown(flat[i.key]) for i in self.ordered]

    def config(self, values: list, shown_model: str | None = None):
        """The job's config from the form's values (in `ordered` order), validated as the CLI validates it.

        Only the values that differ from the defaults the form was showing (those of `shown_model`, the model
        the form was last set to) are the user's choices. They are layered over the chosen model's own
        defaults, as `key=value` words are, so an API call that names only `model=sd15` gets sd15's recipe."""
        given = {i.key: i.read(v) for i, v in zip(self.ordered, values)}
        shown = {i.key: i.read(v) for i, v in zip(self.ordered, self.defaults_for(shown_model or self.model))}
        chosen = {k: v for k, v in given.items() if v != shown[k]}
        chosen["model"] = str(given.get("model") or "").strip() or self.model
        return config.from_dict(self.cls, self.section, config.unflatten(chosen))

    def switch(self, values: list, old: str, new: str) -> list:
        """The form's values when its model changes from `old` to `new`: options still at `old`'s defaults take
        `new`'s, options the user changed keep their values."""
        before, after = self.defaults_for(old or self.model), self.defaults_for(new or self.model)
        return [a if v == b else v for v, b, a in zip(values, before, after)]

    def shown_config(self, saved: dict) -> list:
        """A run's saved config.yaml as the form's values ("Run again"); options it lacks keep their defaults."""
        flat = config.flatten(saved)
        defaults = self.defaults_for(str(flat.get("model", self.model)))
        return [i.shown(flat[i.key]) if i.key in flat else d for i, d in zip(self.ordered, defaults)]
