"""Find and load a diffusers-format text-to-image latent-diffusion folder, one code path for every model.

`resolve_model` turns a preset name, path or hub id into a local folder; `load_components` reads
`model_index.json` and loads each component with the class it names, from safetensors only (pickles
need `allow_pickle=true`, and then load with `weights_only`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from pathlib import Path

from .config import model_preset, model_presets
from .errors import UserError
from .runtime import cache_dir, write_json

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
LIBRARIES = ("diffusers", "transformers")  # the only packages model_index.json may name classes from
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# What a hub download fetches: the components we load, without pickles, fp16/non-EMA variants or root checkpoints.
HUB_PATTERNS = ["model_index.json"] + [f"{c}/*" for c in COMPONENTS]
MOTION_PATTERNS = ["config.json", "*.safetensors"]  # an AnimateDiff MotionAdapter repository: its root files
HUB_IGNORE = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.h5", "*fp16*", "*non_ema*", "*.ot"]


def resolve_model(name: str, revision: str | None = None) -> tuple[str, Path]:
    """`name` (preset, local folder or hub id) -> (id to record, local folder)."""
    preset = model_preset(name)
    if preset is not None:
        if preset.path is not None:  # a model shipped inside this repository (ToyWorld)
            local = REPO_ROOT / preset.path
            if not (local / "model_index.json").is_file():
                raise UserError(f"model preset '{name}' expects {local}, which is missing; "
                                f"train it with `python run.py train prior` or pass model=PATH")
            return name, local
        name, revision = preset.id, preset.revision or revision
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {path} is a file; pass the diffusers-format folder that holds model_index.json")
        return str(path.resolve()), path
    if looks_like_hub_id(name):
        return name, download(name, revision)
    known = ", ".join(model_presets()) or "none"
    raise UserError(f"unknown model '{name}': not a preset ({known}) and no such path exists")


def preset_folder(model: str, key: str) -> str | None:
    """What a model preset names as `motion:` or `interpolation:`: a folder inside this repository, or a hub id
    (returned as it is, e.g. an AnimateDiff adapter), or None."""
    preset = model_preset(model)
    value = getattr(preset, key) if preset is not None else None
    if not value:
        return None
    local = REPO_ROOT / value
    return value if not local.exists() and looks_like_hub_id(value) else str(local)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def download(repo_id: str, revision: str | None, allow: list[str] = HUB_PATTERNS) -> Path:
    """Hub id -> local snapshot of the files `allow` matches, less HUB_IGNORE (cache first, so an offline
    machine with a cached copy works)."""
    from huggingface_hub import snapshot_download

    patterns = {"allow_patterns": allow, "ignore_patterns": HUB_IGNORE}
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, **patterns))
    except Exception:
        pass
    try:
        logger.info("downloading %s from the Hugging Face Hub", repo_id)
        return Path(snapshot_download(repo_id, revision=revision, **patterns))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot fetch '{repo_id}' from the Hugging Face Hub ({reason}); download it on a machine with "
            f"network (`hf download {repo_id} --local-dir DIR`) and pass model=DIR"
        ) from None


def check_folder(path: Path, allow_pickle: bool) -> dict:
    """Validate the folder layout before loading anything; returns model_index.json."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path} is not a diffusers-format model folder: it has no model_index.json")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index_file} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_file} must map component names to [library, class], got a {type(index).__name__}")
    for name in COMPONENTS:
        spec = index.get(name)
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0]) or not (path / name).is_dir():
            raise UserError(f"model folder {path} is missing the '{name}' component (expected {path / name}/ "
                            f"and an entry in model_index.json)")
        if spec[0] not in LIBRARIES or not isinstance(spec[1], str) or not spec[1].isidentifier():
            raise UserError(f"{index_file} names {spec[0]}.{spec[1]} for '{name}': only diffusers and transformers "
                            "classes load")
    for name in WEIGHTED:
        _check_weights(path / name, allow_pickle)
    return index


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not safetensors and not pickles:
        raise UserError(f"{folder} holds no weights (*.safetensors)")
    if not safetensors and not allow_pickle:
        raise UserError(f"{folder} has only pickle weights ({pickles[0].name}); these can run code when loaded. "
                        f"Convert them to safetensors, or pass allow_pickle=true if you trust the source")
    for p in safetensors:
        check_safetensors(p)


def check_safetensors(path: Path) -> None:
    """Parse the header and check the payload size, so truncation is caught before loading."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"file is {size} bytes but its header needs {8 + n + max(ends)}")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}); re-download or re-export it") from None


def load_safetensors(path: Path) -> dict:
    """A safetensors file's tensors, or one line naming the file when it is truncated, corrupt or not finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0][:120]}); re-download or re-export it") from None
    check_finite(state, path)
    return state


def load_components(path: Path, index: dict, allow_pickle: bool) -> dict:
    """Load unet, vae, text_encoder, tokenizer and scheduler with the classes model_index.json names."""
    if allow_pickle:
        # torch.load honours this for every call inside transformers/diffusers: tensors only, no code.
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    out = {}
    for name in COMPONENTS:
        library, class_name = index[name]
        try:
            cls = getattr(importlib.import_module(library), class_name)
        except (ImportError, AttributeError):
            raise UserError(f"model_index.json names {library}.{class_name} for '{name}', which is not installed") from None
        kwargs = {}
        if name in WEIGHTED:
            kwargs = {"use_safetensors": not allow_pickle or _has_safetensors(path / name), "local_files_only": True}
        try:
            if name == "scheduler":
                out[name] = cls.from_pretrained(path, subfolder=name)
            else:
                out[name] = cls.from_pretrained(path / name, **kwargs)
        except UserError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load '{name}' from {path / name}: {first}") from None
        if name in WEIGHTED:
            check_finite(out[name].state_dict(), path / name)
    return out


def check_finite(state: dict, source: Path) -> None:
    """Refuse weights that are missing from the file (left on the meta device by the load) or hold NaN or infinity
    (a corrupt file whose header still reads right)."""
    for key, tensor in state.items():
        if tensor.is_meta:
            raise UserError(f"{source} has no weights for {key}: the file does not match its config; re-download or "
                            "re-export it")
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise UserError(f"{source} holds non-finite weights ({key}): the file is corrupt; re-download or re-export it")


def _has_safetensors(folder: Path) -> bool:
    return any(p.suffix == ".safetensors" for p in folder.iterdir())


def content_hash(path: Path) -> str:
    """sha256 over the files a load reads, each file's own hash cached by path, size and mtime. For a diffusers
    folder: model_index.json and the five components' configs and weights (not variants, not pickles when
    safetensors are there); for any other folder (a judge, temporal layers): every file in it."""
    path = Path(path)
    cache_file = cache_dir() / "file_hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    h, fresh = hashlib.sha256(), False
    for p in _loaded_files(path):
        stat = p.stat()
        key = f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if not isinstance(cache.get(key), str):
            cache[key], fresh = _file_hash(p), True
        h.update(str(p.relative_to(path)).encode() + cache[key].encode())
    if fresh:  # forget files that are gone, so the cache does not grow without end
        cache = {k: v for k, v in cache.items() if Path(k.rsplit(":", 2)[0]).exists()}
        try:
            write_json(cache_file, cache)
        except OSError:
            pass  # a read-only cache only costs time
    return h.hexdigest()


def _loaded_files(path: Path) -> list[Path]:
    if not (path / "model_index.json").is_file():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path / "model_index.json"]
    for name in COMPONENTS:
        found = [p for p in sorted((path / name).glob("*")) if p.is_file() and "fp16" not in p.name
                 and "non_ema" not in p.name]
        weights = [p for p in found if p.suffix == ".safetensors"] or [p for p in found if p.suffix in PICKLE_SUFFIXES]
        files += [p for p in found if p.suffix in (".json", ".txt", ".model")] + weights
    return files


def _file_hash(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()
