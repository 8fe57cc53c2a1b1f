"""What a model load reads and records: the content hash covers exactly the files loaded, and is cached."""

import json
import os
import shutil

import pytest

import pipelines.loading
from pipelines.loading import content_hash


@pytest.fixture
def model(tiny_sd, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_sd, path)
    return path


def test_content_hash_covers_the_loaded_files_and_nothing_else(model):
    before = content_hash(model)
    # what SD repositories also hold, and a load never reads: a root checkpoint, variants, other components
    (model / "v1-5-pruned.safetensors").write_bytes(b"x" * 100)
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x" * 100)
    (model / "unet" / "diffusion_pytorch_model.non_ema.safetensors").write_bytes(b"x" * 100)
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x" * 100)  # safetensors are there: not loaded
    (model / "safety_checker").mkdir()
    (model / "safety_checker" / "model.safetensors").write_bytes(b"x" * 100)
    assert content_hash(model) == before
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte of a loaded file
    assert content_hash(model) != before
    config = model / "scheduler" / "scheduler_config.json"
    changed = content_hash(model)
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 7}))
    assert content_hash(model) != changed


def test_content_hash_reads_a_file_again_only_when_its_size_or_mtime_changes(model, monkeypatch):
    reads = []
    file_hash = pipelines.loading._file_hash
    monkeypatch.setattr(pipelines.loading, "_file_hash", lambda p: reads.append(p.name) or file_hash(p))
    first = content_hash(model)
    assert "diffusion_pytorch_model.safetensors" in reads and "model_index.json" in reads
    reads.clear()
    assert content_hash(model) == first and reads == []  # all from the cache
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))
    assert content_hash(model) == first and reads == ["diffusion_pytorch_model.safetensors"]


def test_a_broken_hash_cache_is_rebuilt(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = content_hash(model)
    cache = tmp_path / "cache" / "text2world" / "file_hashes.json"
    for junk in ("[1, 2]", "{not json", '{"x": 3}'):
        cache.write_text(junk)
        assert content_hash(model) == first


def test_any_other_folder_hashes_every_file(tmp_path):
    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "judge.safetensors").write_bytes(b"abc")
    first = content_hash(folder)
    (folder / "judge.safetensors").write_bytes(b"abd")
    assert content_hash(folder) != first


# ---------------------------------------------------------------- what a hub download fetches

SD15_REPO = [  # stable-diffusion-v1-5's files, as the hub lists them
    "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors", "README.md",
]
ADAPTER_REPO = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "README.md"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in Hugging Face Hub: repo id -> local folder. snapshot_download copies what huggingface_hub's own
    pattern filter keeps, so the test checks the patterns a download passes, with the hub's matching rules."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repos, fetched = {}, {}

    def snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, ignore_patterns=None):
        files = sorted(str(p.relative_to(repos[repo_id])) for p in repos[repo_id].rglob("*") if p.is_file())
        keep = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        fetched[repo_id] = keep
        snapshot = tmp_path / "snapshots" / repo_id
        for name in keep:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repos[repo_id] / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, fetched


def fill(folder, names, source=None):
    """A repo folder with `names`; those `source` has are copied from it, the rest are placeholders."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if source is not None and (source / name).is_file():
            shutil.copy(source / name, folder / name)
        else:
            (folder / name).write_bytes(b"never fetched")
    return folder


def test_a_model_download_fetches_only_the_loaded_components(hub, tiny_sd, tmp_path):
    from pipelines.loading import resolve_model

    repos, fetched = hub
    names = SD15_REPO + [str(p.relative_to(tiny_sd)) for p in tiny_sd.rglob("*") if p.is_file()]
    repos["org/sd15"] = fill(tmp_path / "sd15", sorted(set(names)), tiny_sd)
    model_id, local = resolve_model("org/sd15")
    assert model_id == "org/sd15" and (local / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    got = set(fetched["org/sd15"])
    assert "unet/diffusion_pytorch_model.safetensors" in got and "tokenizer/vocab.json" in got
    for skipped in ("v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "safety_checker/model.safetensors",
                    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
                    "unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin", "README.md"):
        assert skipped not in got, skipped


def test_a_motion_adapter_download_fetches_its_root_weights(hub, tiny_sd, tmp_path):
    from pipelines.prior import Prior
    from tests.test_animatediff import save_adapter
    from video.pipeline import AnimateDiffUNet, load_motion

    repos, fetched = hub
    adapter = save_adapter(tmp_path / "adapter")
    repos["org/motion"] = fill(tmp_path / "motion-repo", ADAPTER_REPO, adapter)
    unet = load_motion(Prior.from_pretrained(str(tiny_sd)), "org/motion")
    assert isinstance(unet, AnimateDiffUNet)
    assert sorted(fetched["org/motion"]) == ["config.json", "diffusion_pytorch_model.safetensors"]
