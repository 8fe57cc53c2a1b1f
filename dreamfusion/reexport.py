"""`python run.py export RUN_DIR [key=value ...]`: a 3d run exported again with other mesh or turntable settings,
from its final field or, for an unfinished run, its last checkpoint. Options not given keep the run's own;
the files go to a new folder RUN_DIR/export-<time>/, and nothing of the run is overwritten."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path

from pipelines.config import to_dict
from pipelines.rundir import RunDir
from pipelines.runtime import command_line, pick_device, write_yaml

from .config import ExportConfig, ThreeDConfig
from .fit import export_asset, load_asset
from .renderer import make_renderer

logger = logging.getLogger(__name__)


def main(cfg: ExportConfig, run_dir: Path, progress: bool = True) -> Path:
    run = RunDir.existing(run_dir, "3d")
    full = run.resumed(ThreeDConfig, {**cfg.chosen(), "device": cfg.device})  # the run's, with the export options given
    device = pick_device(cfg.device)
    asset = load_asset(run.path, full, device)  # fails before anything is written
    folder = run / f"export-{datetime.now():%Y%m%d-%H%M%S}"
    for i in range(2, 1000):
        if not folder.exists():
            break
        folder = folder.with_name(f"{folder.name.split('~')[0]}~{i}")
    tmp = folder.with_name(f".{folder.name}.partial")
    tmp.mkdir(parents=True)
    try:
        export_asset(asset, make_renderer(device, full.render, full.field.bound), full, tmp, progress)
        write_yaml(tmp / "config.yaml", {**to_dict(full.export), "device": cfg.device, "command": command_line()})
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported to %s", folder)
    return folder
