"""Run-time plumbing every job shares: device/dtype choice, run directories, atomic writes.

A run directory is `OUT/<job>/<YYYYmmdd-HHMMSS>-<prompt-slug>/`. It is created exclusively (a second
run with the same name gets `-2`, `-3`, ...), so nothing is ever overwritten, and every file in it
is written to a hidden temp file and renamed into place, so a killed run leaves no half-written
file under a final name.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
import yaml

from .errors import UserError
from .options import DTYPES

UMASK = os.umask(0)  # the process umask, read once at import (reading it means setting it)
os.umask(UMASK)



def cache_dir() -> Path:
    """This project's cache folder: $XDG_CACHE_HOME/text2world, or ~/.cache/text2world."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "text2world"


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu, unless the user named one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name}, but only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 ...)")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on other accelerators, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use auto, fp32, fp16 or bf16")
    return getattr(torch, DTYPES[name])


def slugify(text: str, max_len: int = 48) -> str:
    """A file-name-safe slug: lowercase [a-z0-9-], no separators, no '..', bounded length."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "untitled"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds (else remove it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # readable like any other output: mkstemp and safetensors make 0600
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def install_dir(source: Path, target: Path) -> None:
    """Copy folder `source` to `target`, replacing a previous `target` only once the copy is complete."""
    source, target = Path(source), Path(target)
    tmp, old = target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_yaml(path: str | Path, data) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Timer:
    """Wall time per named stage: `with timer("denoise"): ...` -> timer.stages["denoise"] seconds."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = round(self.stages.get(stage, 0.0) + time.perf_counter() - start, 4)


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])
