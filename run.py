#!/usr/bin/env python
"""One runner for every job: `python run.py JOB [PROMPT] [key=value ...]`.

    python run.py image "a red cube" steps=20 guidance=5 seed=3
    python run.py 3d "a red cube" field.encoding=hashgrid export.formats=[glb]
    python run.py 4d "a red ball moving right" dynamic.steps=300
    python run.py image steps=20 -- "style=anime cat"         # a prompt with an '=' goes after --
    accelerate launch run.py image --prompts prompts.txt      # prompts split across GPUs

Options start from the job's dataclass defaults and the model preset's section, then --config FILE, then
key=value words; they are checked once, before anything is loaded or written. A job's modules are imported
only when it runs. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines import config
from pipelines.errors import UserError, disk_error, not_a_file


@dataclass(frozen=True)
class Job:
    """One runnable job: its config class and the module whose `main` runs it, both as import paths."""

    config: str  # "module:Class", a torch-free module
    module: str
    summary: str
    section: str | None = None  # the model presets' section that may change its defaults (configs/models/)
    prompt: bool = False  # takes a prompt (or --prompts FILE)
    run_dir: bool = False  # takes a run directory (export)
    clips: bool = False  # trains on clips: `data=` names their source

    def cls(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


# `run.py JOB [WHAT]`: jobs with a prompt have no WHAT (key None); train/eval name what they act on.
JOBS: dict[str, dict[str | None, Job]] = {
    "image": {None: Job("pipelines.options:ImageConfig", "pipelines.image", "text -> image PNGs from the prior",
                        prompt=True)},
    "video": {None: Job("video.config:VideoConfig", "video.pipeline",
                        "text -> MP4 clip: the prior's UNet inflated with temporal layers", prompt=True)},
    "3d": {None: Job("dreamfusion.config:ThreeDConfig", "dreamfusion.fit",
                     "text -> 3D asset: SDS from the prior into a NeRF, exported as OBJ/GLB/PLY + turntables",
                     section="3d", prompt=True)},
    "4d": {None: Job("fourd.config:FourDConfig", "fourd.fit",
                     "text -> moving 3D asset: the 3d fit, then video SDS through the motion layers moves it "
                     "(MP4s, per-frame PLYs, animated GLB)", section="4d", prompt=True)},
    "export": {None: Job("dreamfusion.config:ExportConfig", "dreamfusion.reexport",
                         "re-export a 3d run (or its last checkpoint) with other mesh/turntable settings", run_dir=True)},
    "ui": {None: Job("ui.config:UIConfig", "ui.app",
                     "the web app: every job from a browser, and the gallery of runs (127.0.0.1:7860)")},
    "train": {
        "prior": Job("toyworld.config:TrainPriorConfig", "toyworld.train_prior",
                     "the ToyWorld prior (VAE, text encoder, UNet) from rendered data"),
        "judge": Job("evals.config:TrainJudgeConfig", "evals.judge",
                     "the ToyWorld judge: a small CNN naming colour, shape and view"),
        "temporal": Job("video.config:TrainTemporalConfig", "video.train",
                        "the video UNet's temporal layers on clips, the prior frozen (Make-A-Video)", clips=True),
        "interpolation": Job("video.config:TrainInterpolationConfig", "video.train",
                             "the masked-frame model for interpolate= and image= (known frames + mask)", clips=True),
    },
    "eval": {
        "image": Job("evals.config:EvalImageConfig", "evals.image",
                     "the prior's images of every colour x shape prompt, scored by the judge"),
        "video": Job("evals.config:EvalVideoConfig", "evals.video",
                     "clips of colour x shape x motion prompts: judge per frame, motion from silhouettes"),
        "3d": Job("evals.config:Eval3DConfig", "evals.threed",
                  "3D assets of colour x shape prompts: mesh IoU against the true primitive, judge on renders, views",
                  section="3d"),
        "4d": Job("evals.config:Eval4DConfig", "evals.fourd",
                  "moving 3D assets of shape x motion prompts: per-frame mesh IoU, the path against the motion word, colour",
                  section="4d"),
    },
}
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message by default)
        raise UserError(f"{message} (see `python run.py --help`)")


def options_help(job: Job) -> str:
    """Every option with the default a plain command gets and its meaning, top-level options first, then
    one block per group (`field.`, `camera.`, ...)."""
    cls = job.cls()
    defaults = config.job_defaults(cls, job.section)
    model = getattr(defaults, "model", None)
    lines = []
    if model is not None and config.model_defaults(model, job.section):
        lines.append(f"  (defaults for model={model}: the dataclass defaults with the `{job.section}:` section of "
                     f"configs/models/{model}.yaml; another model starts from the dataclass defaults)")
    rows = config.describe(defaults)
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    groups = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if dataclasses.is_dataclass(getattr(defaults, f.name))}
    for key, value, meaning in [r for r in rows if "." not in r[0]]:
        lines.append(f"  {f'{key}={value}':<{width}} {meaning}")
    for name, meaning in groups.items():
        lines.append(f"\n {name}.  {meaning}")
        lines += [f"  {f'{k}={v}':<{width}} {m}" for k, v, m in rows if k.startswith(name + ".")]
    return "\n".join(lines)


def jobs_help(name: str) -> str:
    return "\n\n".join(f"{' '.join(filter(None, (name, what)))}: {job.summary}\n"
                        f"options (key=default  meaning):\n{options_help(job)}" for what, job in JOBS[name].items())


def build_parser(detailed: str | None = None) -> Parser:
    """The parser; `detailed` names the one job whose options its help lists (importing only its config)."""
    fmt = argparse.RawDescriptionHelpFormatter
    listing = "jobs:\n" + "\n".join(f"  {' '.join(filter(None, (name, what))):<20} {job.summary}"
                                    for name, variants in JOBS.items() for what, job in variants.items())
    parser = Parser(prog="run.py", description=__doc__, formatter_class=fmt,
                    epilog=listing + "\n\n`python run.py JOB --help` lists a job's options, with their defaults.")
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True, parser_class=Parser)
    for name, variants in JOBS.items():
        summary = variants[None].summary if None in variants else f"{name}: " + ", ".join(variants)
        epilog = jobs_help(name) if name == detailed else None
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=fmt, epilog=epilog)
        resumable = any("resume" in {f.name for f in dataclasses.fields(v.cls())} for v in variants.values())
        if None in variants and variants[None].run_dir:
            p.add_argument("args", nargs="*", metavar="RUN_DIR | key=value", help="the run directory, then option overrides")
        elif None in variants and not variants[None].prompt:
            p.add_argument("args", nargs="*", metavar="key=value", help="option overrides")
        elif None in variants:
            p.add_argument("args", nargs="*", metavar="PROMPT | key=value",
                           help="the prompt, then option overrides; a prompt with an '=' goes last, after --: "
                                "python run.py image steps=20 -- \"style=anime cat\"")
            p.add_argument("--prompts", metavar="FILE", help="run every line of FILE as a prompt (blank lines and # comments skipped)")
        else:
            p.add_argument("what", metavar="WHAT", help=" | ".join(variants))
            p.add_argument("args", nargs="*", metavar="key=value", help="option overrides")
        if resumable:
            p.add_argument("--resume", metavar="RUN_DIR", help="continue this run where it stopped (same config; "
                                                              "the same as resume=RUN_DIR)")
        p.add_argument("--config", metavar="FILE", help="YAML file of options, applied before key=value overrides")
        p.add_argument("--out", metavar="DIR", default="outputs", help="root of the run directories (default: outputs)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    return parser


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional words -> (prompt words, key=value overrides)."""
    overrides = [a for a in args if OVERRIDE.match(a)]
    return [a for a in args if not OVERRIDE.match(a)], overrides


def read_prompts(words: list[str], prompts_file: str | None) -> list[str]:
    if prompts_file:
        if words:
            raise UserError("give either a prompt or --prompts FILE, not both")
        path = Path(prompts_file)
        if not path.is_file():
            raise not_a_file(f"prompts file {path}", path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"prompts file {path} is not UTF-8 text") from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise UserError(f"prompts file {path} holds no prompt")
        return prompts
    if len(words) > 1:
        raise UserError(f"expected one prompt, got {len(words)} words; quote the prompt: \"{' '.join(words)}\"")
    if not words or not words[0].strip():
        raise UserError("the prompt is empty; write what to generate, e.g. \"a red cube\"")
    return [words[0].strip()]


def clip_source(data: str):
    """What `train temporal|interpolation data=` names: ToyWorld's rendered clips, or a folder of videos."""
    if data == "toyworld":
        from toyworld.video import rendered_clips

        return rendered_clips
    from video.data import video_folder

    return video_folder(data)


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error(); tlog.set_verbosity_error()
        dlog.disable_progress_bar(); tlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    literal: list[str] = []  # words after `--` are the prompt, even with an `=` in them
    if "--" in argv:
        argv, literal = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    try:
        parser = build_parser(detailed=next((a for a in argv if a in JOBS), None) if {"-h", "--help"} & set(argv) else None)
        # key=value words may come after --options too; argparse leaves those over, so collect them.
        args, extra = parser.parse_known_args(argv)
        unknown = [e for e in extra if not OVERRIDE.match(e)]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.args = args.args + extra
        words, overrides = split_args(args.args)
        words += literal
        variants, what = JOBS[args.job], getattr(args, "what", None)
        if what not in variants:
            raise UserError(f"cannot {args.job} '{what}': choose one of {', '.join(variants)}")
        job = variants[what]
        cls = job.cls()
        resume = getattr(args, "resume", None)
        if resume:
            if "resume" not in {f.name for f in dataclasses.fields(cls)}:
                raise UserError(f"{args.job} {what} cannot be resumed: start it again")
            overrides = overrides + [f"resume={resume}"]
        if hasattr(args, "out") and not str(args.out).strip():
            raise UserError("--out is empty: pass --out DIR, or leave it out for outputs/")
        cfg = config.load(cls, job.section, overrides, args.config)
        configure_logging(args.quiet)
        runner = importlib.import_module(job.module).main
        if job.run_dir:
            if len(words) != 1:
                raise UserError(f"{args.job} takes one run directory, got {len(words)}: python run.py {args.job} RUN_DIR [key=value ...]")
            runner(cfg, Path(words[0]), progress=not args.quiet)
        elif job.prompt and resume and not words and not args.prompts:
            runner(cfg, None, args.out, progress=not args.quiet)  # the run's own prompt
        elif job.prompt:
            runner(cfg, read_prompts(words, args.prompts), args.out, progress=not args.quiet)
        elif words:
            raise UserError(f"unexpected argument '{words[0]}': {args.job} options are key=value")
        elif job.clips:
            runner(cfg, args.out, progress=not args.quiet, clip_source=clip_source)
        else:
            runner(cfg, args.out, progress=not args.quiet)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the disk is full or read-only: what the run started is removed, say it in one line
        reason = disk_error(e)
        if reason is None:
            raise
        print(f"error: {reason}; free some space or pass --out DIR", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
