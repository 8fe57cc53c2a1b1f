"""Benchmark harness: `python -m bench` (or `python bench/run.py`) -> bench/results/<YYYY-MM-DD>-<device>.{json,md}.

Each case (bench/cases.py) runs its `ours` and `peer` callables once each as a warm-up, then
`--repeats` times each, interleaved (ours, peer, ours, peer, ...) so that load from other processes
falls on both sides alike. The reported time is the median of the repeats; warm-up is reported apart.

Peak memory per side: CUDA's max_memory_allocated (weights included), or on CPU the rise of the resident
memory over its value at the start (sampled every 10 ms, after malloc_trim): bench/README.md has the details.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.cases import CASES, SETTINGS, Case
from pipelines.runtime import versions, write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------- measuring
def _rss() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """`with PeakMemory(device) as m: ...` -> m.peak in bytes (None where it cannot be measured)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        _trim_heap()  # give freed memory back to the OS, or reuse of an earlier run's pages would not show
        self._base = self._max = _rss()
        if self._base is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self._max = max(self._max, _rss() or 0)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss() or 0) - self._base


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, int | None, object]:
    """(seconds, peak memory bytes, output) of one call."""
    torch.manual_seed(0)  # the callables seed their own generators; this covers anything else
    sync(device)
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak, out


def abs_diff(a, b, reduce=torch.max) -> float | None:
    """The largest (`reduce=torch.mean`: the mean) absolute difference of two same-shaped outputs, else None."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    diff = reduce((a.detach().float().cpu() - b.detach().float().cpu()).abs()).item()
    return diff if math.isfinite(diff) else None


def run_case(case: Case, repeats: int, device: str) -> dict:
    """Warm-up, then `repeats` interleaved timed runs per side -> one result row."""
    sides = {"ours": case.ours, **({"peer": case.peer} if case.peer is not None else {})}
    row: dict = {"case": case.name}
    outputs, times, peaks = {}, {k: [] for k in sides}, {k: [] for k in sides}
    for side, fn in sides.items():
        row[f"{side}_warmup_s"], _, outputs[side] = timed(fn, device) if case.warmup else (None, None, None)
    for _ in range(repeats):
        for side, fn in sides.items():
            seconds, peak, outputs[side] = timed(fn, device)
            times[side].append(seconds)
            peaks[side].append(peak)
    for side in ("ours", "peer"):
        row[f"{side}_s"] = statistics.median(times[side]) if side in sides else None
        row[f"{side}_runs_s"] = times.get(side)
        measured = [p for p in peaks.get(side, []) if p is not None]
        row[f"{side}_peak_mem_bytes"] = max(measured) if measured else None
    row["ratio"] = row["ours_s"] / row["peer_s"] if row["peer_s"] else None
    row["max_abs_diff"] = abs_diff(outputs.get("ours"), outputs.get("peer"))
    row["mean_abs_diff"] = abs_diff(outputs.get("ours"), outputs.get("peer"), reduce=torch.mean)
    row.update(case.meta)
    if row.get("target_s") is not None:
        row["target_met"] = row["ours_s"] <= row["target_s"] if device == "cpu" else None  # a CPU target
    return row


# ------------------------------------------------------------------------------------------ reporting
def _s(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _mem(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _shapes(r: dict) -> str:
    n = f"{r['frames']} frames" if "frames" in r else f"{r.get('images', 1)} image"
    peer_steps = f" (peer: {r['peer_steps']} steps {r['peer_sampler'].upper()})" if "peer_steps" in r else ""
    return (f"{r['model']}: {n} {r['height']}×{r['width']}, {r['steps']} steps {r['sampler'].upper()}{peer_steps}, "
            f"CFG {r['guidance']}, {r['dtype']}")


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [
        f"# Benchmark: size {report['size']} on {report['device_name']} ({report['date']})", "",
        f"{report['threads']} torch CPU thread(s); median of {report['repeats']} run(s) per side after one warm-up "
        f"run each (reported apart), ours and peer interleaved. Peak memory: {report['memory']}."
        + (" Ours with torch.compile: its warm-up includes the compile." if report.get("compile") else "")
        + (" Compiled in reduce-overhead mode (CUDA graphs)." if report.get("cuda_graphs") else ""), "",
        "| case | ours (s) | peer (s) | ours/peer | warm-up ours / peer (s) | peak memory ours / peer "
        "| max abs diff | torch | diffusers | shapes, steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | | {v['torch']} | {v['diffusers']} | |")
            continue
        diff = "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(
            f"| {r['case']} | {_s(r['ours_s'])} | {_s(r['peer_s'])} | {_s(r['ratio'])} "
            f"| {_s(r['ours_warmup_s'])} / {_s(r.get('peer_warmup_s'))} "
            f"| {_mem(r['ours_peak_mem_bytes'])} / {_mem(r['peer_peak_mem_bytes'])} | {diff} "
            f"| {v['torch']} | {v['diffusers']} | {_shapes(r)} |")
    lines.append("")
    for r in report["cases"]:
        if r.get("target_s") is not None and "error" not in r:
            verdict = {True: "met", False: "missed", None: "not applicable on this device"}[r["target_met"]]
            lines.append(f"- {r['case']}: {_s(r['ours_s'])} s against the target {r['target']}: {verdict} "
                         f"(measured with {report['threads']} torch thread(s)).")
    for r in report["cases"]:
        if "peer_steps" in r and "error" not in r:
            lines.append(f"- {r['case']}: fewer steps, a separate axis: ours at {r['steps']} {r['sampler']} steps against "
                         f"the peer's {r['peer_steps']} {r['peer_sampler']} steps, so its ratio is not an equal-steps ratio, "
                         f"and its outputs differ from the peer's by design (mean abs diff {r['mean_abs_diff']:.3f}). "
                         f"Whether the quality holds is `python run.py eval video sampler={r['sampler']} steps={r['steps']}`'s "
                         f"to say.")
    for r in report["cases"]:
        if r.get("ours_step_s") is not None:
            base = r.get("peer_step_s")
            against = f" against the baseline {r['baseline']}'s {base:.3f} s (ratio {r['ours_step_s'] / base:.2f})" if base else ""
            lines.append(f"- {r['case']}: the fit takes {r['ours_step_s']:.3f} s a step{against}; the asset's ratio above "
                         f"is the whole command's wall time, process start to turntables.")
            if r.get("ours_peak_rss_mib"):
                base = f" against the baseline's {r['peer_peak_rss_mib']:.0f} MiB" if r.get("peer_peak_rss_mib") else ""
                lines.append(f"- {r['case']}: each run is a process of its own, so the peak memory column sees none of "
                             f"it; the job's own peak RSS is {r['ours_peak_rss_mib']:.0f} MiB{base}.")
    for r in report["cases"]:
        if r.get("peer"):
            lines.append(f"- {r['case']}: peer is {r['peer']}, on the same modules, scheduler config and seed.")
    return "\n".join(lines).rstrip() + "\n"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model}, {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Time our pipelines against diffusers' "
                                "on the same weights, seed, shapes and steps; write a JSON and a markdown table.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="small: ToyWorld on CPU-sized settings; full: SD-1.5-sized random weights, 512x512, fp16")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)} (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side after one warm-up; the median is reported")
    p.add_argument("--out", default=str(RESULTS), help="folder for <date>-<device>.json and .md")
    p.add_argument("--compile", action="store_true",
                   help="ours also with torch.compile (compile=true); the compile time shows in the warm-up column")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile on CUDA: reduce-overhead mode, the UNet replayed as CUDA graphs (cuda_graphs=true)")
    p.add_argument("--baseline", default=None, metavar="REF",
                   help="3d-asset: the peer is this repository at git REF (a worktree), run interleaved with ours")
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)  # small cases' model (tests: tiny weights)
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        p.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(CASES)}")
    if args.baseline is not None and "3d-asset" not in args.cases:
        p.error("--baseline is the 3d-asset case's peer: add 3d-asset to --cases")
    if args.cuda_graphs and not args.compile:
        p.error("--cuda-graphs replays the compiled UNet: add --compile")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return args


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error(); tlog.set_verbosity_error()
    dlog.disable_progress_bar(); tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    rows = []
    for name in args.cases:
        print(f"[bench] {name} ({args.size}, {args.device}): building", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            case = CASES[name](args.size, args.device, args.model,
                               dataclasses.replace(SETTINGS[args.size], compile=args.compile,
                                                   cuda_graphs=args.cuda_graphs, baseline=args.baseline))
            setup_s = time.perf_counter() - start
            row = run_case(case, args.repeats, args.device)
            row["setup_s"] = setup_s
        except Exception as e:  # keep going: one failing case (e.g. out of memory) should not lose the others
            row = {"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        rows.append(row)
        print(f"[bench] {name}: ours {_s(row.get('ours_s'))} s, peer {_s(row.get('peer_s'))} s"
              + (f" ({row['error']})" if "error" in row else ""), file=sys.stderr, flush=True)
        case = None
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report = {
        "date": datetime.date.today().isoformat(), "device": args.device, "device_name": device_name(args.device),
        "size": args.size, "compile": args.compile, "cuda_graphs": args.cuda_graphs, "repeats": args.repeats, "threads": torch.get_num_threads(), "versions": versions(),
        "memory": "torch.cuda.max_memory_allocated (weights included)" if args.device == "cuda"
                  else "rise of process RSS during a run (weights excluded)",
        "cases": rows,
    }
    stem = (f"{report['date']}-{args.device}" + ("" if args.size == "small" else f"-{args.size}")
            + ("-compiled" if args.compile else "") + ("-graphs" if args.cuda_graphs else ""))
    out = Path(args.out)
    write_json(out / f"{stem}.json", report)
    table = markdown(report)
    write_text(out / f"{stem}.md", table)
    print(table)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
