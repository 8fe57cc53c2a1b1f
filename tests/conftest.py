import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny import save_tiny_sd  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random-weight epsilon-prediction SD-layout folder."""
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """The same layout with v-prediction (as SD-2.x at 768)."""
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def _cache_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, _cache_home):
    """Tests never touch the network, nor the user's ~/.cache (file hashes, compiled kernels)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(_cache_home))


# GPU-only tests: `@requires_cuda` (with the `gpu` marker). The condition is a bool computed here,
# not the function object (nerfacc's `skipif(not torch.cuda.is_available, ...)` never skips).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_3d_runs(tiny_sd, tmp_path_factory):
    """Two tiny 3d fits of the same prompt and settings (tests/test_dreamfusion_fit.py's TINY): one finished, one
    stopped by Ctrl-C at step 3 with a checkpoint. Tests copy them before changing anything."""
    import pipelines.training
    import run
    from tests.test_dreamfusion_fit import TINY

    out = tmp_path_factory.mktemp("tiny-3d")
    fit = lambda where: run.main(["3d", "a red cube", f"model={tiny_sd}", *TINY, "--out", str(out / where)])  # noqa: E731
    assert fit("finished") == 0
    one_step = pipelines.training._one_step

    def interrupted(accel, stage, *args):
        if args[-3] == 3:  # (model, opt, batch_fn, cfg, params, ema, step, warmup, began)
            raise KeyboardInterrupt
        return one_step(accel, stage, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines.training, "_one_step", interrupted)
        assert fit("stopped") == 130
    [finished], [stopped] = ([p for p in (out / w / "3d").iterdir()] for w in ("finished", "stopped"))
    return finished, stopped
