"""One run's folder: `OUT/<job>/<YYYYmmdd-HHMMSS>-<slug>/`, its config.yaml and metadata.json.

A folder is created exclusively (a second run of the same name gets `-2`, `-3`, ...), so nothing is
ever overwritten; every file in it is written to a temp name and renamed. `resumed` is the one rule
by which a run continues with the options it was made with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Callable

from .config import build, flatten, load_yaml, to_dict, unflatten
from .errors import UserError
from .page import write_index
from .runtime import command_line, slugify, versions, write_json, write_text, write_yaml

logger = logging.getLogger(__name__)


def make_output_dir(root: Path) -> Path:
    """Create `root` (and its parents) for outputs, or say in one line why it cannot be."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {root}: {e.strerror}; pass --out DIR with a writable DIR") from None
    return root


def new_folder(parent: Path, stem: str, what: str, sep: str = "-") -> Path:
    """Create and return the first of parent/stem, parent/stem<sep>2, ... that does not exist yet. Each `mkdir` is
    exclusive, so processes started in the same second never share one."""
    for i in range(1, 10_000):
        path = parent / (stem if i == 1 else f"{stem}{sep}{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create {what} directory {path}: {e.strerror}") from None
    raise UserError(f"too many {what}s named {stem} in {parent}")


class RunDir:
    """`with RunDir.create(...) as run:` a run this session made that fails (an error, Ctrl-C) removes its folder,
    unless `run.keep()` says it holds what a resume needs; then it says how to continue."""

    def __init__(self, path: str | Path, fresh: bool = False, job: str | None = None):
        self.path, self.fresh, self.job = Path(path), fresh, job or Path(path).parent.name
        self.keep: Callable[[], bool] = lambda: False

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:  # the run itself is complete; a page that cannot be written is a warning, not a failure
            self._index_quietly()
            return
        if not self.fresh:  # a run made earlier, which failed to continue: left as it was
            return
        try:
            keep = self.keep()
        except Exception:  # cannot tell (say, a damaged checkpoint): keep the folder rather than lose work
            keep = True
        if keep:
            self._index_quietly()
            logger.warning("stopped: %s keeps what a resume needs; continue with --resume %s", self.path, self.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)

    def write_index(self) -> Path:
        """index.html: the folder's own page of its outputs and config, for a browser with no server."""
        return write_index(self.path, self.job)

    def _index_quietly(self) -> None:
        try:
            self.write_index()
        except Exception as e:
            logger.warning("could not write %s: %s", self.path / "index.html", e)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, out: str | Path, job: str, name: str) -> RunDir:
        """A fresh folder OUT/job/<time>-<slug of name>; never an existing one."""
        root = make_output_dir(Path(out) / job)
        if not os.access(root, os.W_OK):
            raise UserError(f"output directory {root} is not writable; pass --out DIR with a writable DIR")
        return cls(new_folder(root, f"{datetime.now():%Y%m%d-%H%M%S}-{slugify(name)}", "run"), fresh=True, job=job)

    @classmethod
    def existing(cls, path: str | Path, job: str) -> RunDir:
        """A run folder made earlier (it has a config.yaml), or one line saying it is not one."""
        run = cls(path, job=job)
        if not (run / "config.yaml").is_file():
            raise UserError(f"{run.path} is not a {job} run directory (no config.yaml)")
        return run

    # ------------------------------------------------------------------------------------ records
    def write_config(self, cfg, **extra) -> None:
        """config.yaml: the resolved options, what else the run needs to be repeated, and the command line."""
        write_yaml(self / "config.yaml", {**to_dict(cfg), **extra, "command": command_line()})

    def config(self) -> dict:
        """config.yaml as written, without the command line."""
        saved = load_yaml(self / "config.yaml")
        saved.pop("command", None)
        return saved

    def write_metadata(self, **fields) -> None:
        """metadata.json: what the job reports, plus package versions and the command line."""
        write_json(self / "metadata.json", {**fields, "versions": versions(), "command": command_line()})

    def metadata(self) -> dict:
        path = self / "metadata.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_json(self, name: str, data) -> Path:
        write_json(self / name, data)
        return self / name

    def write_text(self, name: str, text: str) -> Path:
        write_text(self / name, text)
        return self / name

    # ------------------------------------------------------------------------------------- resume
    def resumed(self, cls: type, given: dict, free: Callable[[str], bool] = lambda key: True):
        """The options to continue this run with: those saved in config.yaml, with each option `given` now
        (dotted keys, as `config.changed` gives them) for which `free(key)` holds; a given option that may not
        change and differs from the saved one is an error."""
        saved = flatten(self.config())
        saved.pop("prompt", None)
        for key, value in given.items():
            if not free(key) and value != saved.get(key):
                raise UserError(f"--resume {self.path}: the run was made with {key}={saved.get(key)}, not "
                                f"{key}={value}; drop the override or start a new run")
        try:
            resumed = build(cls, unflatten({**saved, **{k: v for k, v in given.items() if free(k)}}))
        except UserError as e:  # the saved options, since `given` were checked when this command's config was built
            raise UserError(f"{self.path}/config.yaml does not fit this version's options ({e}): the run was made "
                            "by another version") from None
        if hasattr(resumed, "validate"):
            resumed.validate()
        return resumed

