#!/usr/bin/env python
"""One runner for every job: `python run.py JOB [PROMPT] [key=value ...]`.

    python run.py image "a red cube" steps=20 guidance=5 seed=3
    python run.py image --prompts prompts.txt model=sd15
    accelerate launch run.py image --prompts prompts.txt      # prompts split across processes

Options come from the job's dataclass defaults, then configs/<job>.yaml, then --config FILE, then
key=value overrides; they are validated once, here, before anything is loaded or written.
Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pipelines import config
from pipelines.errors import UserError
from pipelines.image import ImageConfig
from toyworld.train_prior import TrainPriorConfig

# job -> (config class, one-line summary). Presets live in configs/<preset>.yaml.
JOBS = {
    "image": (ImageConfig, "text -> image PNGs from the prior"),
}
# `run.py train WHAT`: what can be trained, each with its config class and preset name.
TRAINERS = {
    "prior": (TrainPriorConfig, "train_prior", "the ToyWorld prior (VAE, text encoder, UNet) from rendered data"),
}
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message by default)
        raise UserError(f"{message} (see `python run.py --help`)")


def options_help(cls: type, job: str) -> str:
    """Every option with its default as this job's preset sets it, and its one-line meaning."""
    rows = config.describe(config.build(cls, config.preset(job)))
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    return "\n".join(f"  {f'{k}={d}':<{width}} {h}" for k, d, h in rows)


def build_parser() -> Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    every = "\n\n".join(f"{job} options (key=default  meaning):\n{options_help(cls, job)}" for job, (cls, _) in JOBS.items())
    trains = "\n\n".join(f"train {what}: {summary}\noptions (key=default  meaning):\n{options_help(cls, preset)}"
                          for what, (cls, preset, summary) in TRAINERS.items())
    every += "\n\n" + trains
    parser = Parser(prog="run.py", description=__doc__, formatter_class=fmt, epilog=every)
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True, parser_class=Parser)
    for job, (cls, summary) in JOBS.items():
        p = jobs.add_parser(job, help=summary, description=summary, formatter_class=fmt,
                            epilog=f"options (key=default  meaning):\n{options_help(cls, job)}")
        p.add_argument("args", nargs="*", metavar="PROMPT | key=value", help="the prompt, then option overrides")
        p.add_argument("--prompts", metavar="FILE", help="run every line of FILE as a prompt (blank lines and # comments skipped)")
        p.add_argument("--config", metavar="FILE", help="YAML file of options, applied before key=value overrides")
        p.add_argument("--out", metavar="DIR", default="outputs", help="root of the run directories (default: outputs)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    p = jobs.add_parser("train", help="train a model: " + ", ".join(TRAINERS), formatter_class=fmt,
                        description="train a model (under Accelerate; `accelerate launch run.py train ...` for several GPUs)",
                        epilog=trains)
    p.add_argument("what", metavar="WHAT", help=" | ".join(TRAINERS))
    p.add_argument("args", nargs="*", metavar="key=value", help="option overrides")
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
            raise UserError(f"prompts file {path} does not exist")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise UserError(f"prompts file {path} holds no prompt")
        return prompts
    if len(words) > 1:
        raise UserError(f"expected one prompt, got {len(words)} words; quote the prompt: \"{' '.join(words)}\"")
    if not words or not words[0].strip():
        raise UserError("the prompt is empty; write what to generate, e.g. \"a red cube\"")
    return [words[0].strip()]


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
    try:
        parser = build_parser()
        # key=value words may come after --options too; argparse leaves those over, so collect them.
        args, extra = parser.parse_known_args(argv)
        unknown = [e for e in extra if not OVERRIDE.match(e)]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.args = args.args + extra
        configure_logging(args.quiet)
        words, overrides = split_args(args.args)
        if args.job == "train":
            if args.what not in TRAINERS:
                raise UserError(f"cannot train '{args.what}': choose one of {', '.join(TRAINERS)}")
            if words:
                raise UserError(f"unexpected argument '{words[0]}': train options are key=value")
            cls, preset, _ = TRAINERS[args.what]
            cfg = config.load(cls, preset, overrides, args.config)
            from toyworld.train_prior import main as train_prior

            train_prior(cfg, args.out, progress=not args.quiet)
            return 0
        cls = JOBS[args.job][0]
        cfg = config.load(cls, args.job, overrides, args.config)
        prompts = read_prompts(words, args.prompts)
        if args.job == "image":
            from pipelines.image import main as image_main

            image_main(cfg, prompts, args.out, progress=not args.quiet)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
