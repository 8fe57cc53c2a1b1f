"""The benchmark harness runs end to end on tiny random weights and writes its JSON and markdown table."""

import json
import math
import subprocess
import sys

import pytest
import torch

from bench.run import main
from tests.conftest import ROOT


@pytest.fixture
def one_thread():
    """conftest asks for 2 threads; tiny models on a shared 2-core machine run far faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_writes_results(tiny_sd, tmp_path, one_thread):
    assert main(["--device", "cpu", "--size", "small", "--cases", "image,video,video-dpm", "--repeats", "1",
                 "--out", str(tmp_path), "--model", str(tiny_sd)]) == 0
    [path] = tmp_path.glob("*-cpu.json")
    report = json.loads(path.read_text())
    rows = {r["case"]: r for r in report["cases"]}
    assert set(rows) == {"image", "video", "video-dpm"}
    for r in rows.values():
        for key in ("ours_s", "peer_s", "ratio", "ours_warmup_s", "peer_warmup_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], key, r[key])
        assert r["guidance"] == 7.5 and 0 <= r["mean_abs_diff"] <= r["max_abs_diff"]
    for r in (rows["image"], rows["video"]):  # equal steps: the same computation on both sides
        assert r["steps"] == 25 and r["sampler"] == "ddim" and "peer_steps" not in r
        assert r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-3
    fewer = rows["video-dpm"]  # its own row: ours at 12 DPM-Solver++ steps, the peer at its 25 DDIM steps
    assert (fewer["steps"], fewer["sampler"], fewer["peer_steps"], fewer["peer_sampler"]) == (12, "dpm++", 25, "ddim")
    assert fewer["max_abs_diff"] > 1e-3  # not the same computation
    assert rows["video"]["frames"] == fewer["frames"] == 16
    table = path.with_suffix(".md").read_text()
    assert "| image |" in table and "| video |" in table and "ours/peer" in table
    assert "12 steps DPM++ (peer: 25 steps DDIM)" in table and "video-dpm: fewer steps, a separate axis" in table


def test_script_entry_point_and_bad_case(capsys):
    proc = subprocess.run([sys.executable, "bench/run.py", "--cases", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown case(s) nope" in proc.stderr
    with pytest.raises(SystemExit) as e:
        main(["--cuda-graphs"])
    assert e.value.code == 2 and "add --compile" in capsys.readouterr().err


def test_bench_sds_case_runs_both_sides(tiny_sd, tmp_path, one_thread):
    assert main(["--device", "cpu", "--size", "small", "--cases", "sds", "--repeats", "1",
                 "--out", str(tmp_path), "--model", str(tiny_sd)]) == 0
    [path] = tmp_path.glob("*-cpu.json")
    [row] = json.loads(path.read_text())["cases"]
    assert row["case"] == "sds" and row["ours_s"] > 0 and row["peer_s"] > 0 and row["ratio"] > 0


def test_3d_asset_against_a_baseline_commit(tiny_sd, tmp_path, monkeypatch):
    """--baseline REF: the same `run.py 3d` command in a git worktree at REF, interleaved with ours, each in a
    fresh process; per-step fit times come from each run's metadata."""
    import bench.cases
    from tests.test_dreamfusion_fit import TINY

    monkeypatch.setattr(bench.cases, "ASSET_OPTIONS", [a for a in TINY if a != "--quiet"] + ["val_every=0"])
    assert main(["--device", "cpu", "--cases", "3d-asset", "--repeats", "1", "--baseline", "HEAD",
                 "--out", str(tmp_path), "--model", str(tiny_sd)]) == 0
    [path] = tmp_path.glob("*-cpu.json")
    [row] = json.loads(path.read_text())["cases"]
    assert row["case"] == "3d-asset" and row["baseline"].startswith("HEAD (") and row["steps"] == 4
    assert row["ours_warmup_s"] is None and len(row["ours_runs_s"]) == len(row["peer_runs_s"]) == 1
    assert row["ours_s"] > row["ours_step_s"] * 4 > 0 and row["peer_s"] > row["peer_step_s"] * 4 > 0
    assert row["ratio"] == row["ours_s"] / row["peer_s"]
    # the job's own peak RSS (a process that imported torch and loaded a model), not the harness's
    assert row["ours_peak_rss_mib"] > 150 and row["peer_peak_rss_mib"] > 150
    assert "the fit takes" in path.with_suffix(".md").read_text() and "peak RSS" in path.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        main(["--cases", "sds", "--baseline", "HEAD"])
