"""`python run.py export RUN_DIR [key=value ...]`: a 3d run exported again with other mesh or turntable settings,
from its final field or, for an unfinished run, its last checkpoint. Options not given keep the run's own;
the files go to a new folder RUN_DIR/export-<time>/, and nothing of the run is overwritten.

Exports of one run may run at once: each builds in its own hidden temp folder (`tempfile.mkdtemp`), then
claims its name with an exclusive `os.mkdir` (the first free one of export-<time>, export-<time>~2, ...)
and renames the finished folder onto that empty one, so two exports never pick the same folder and a
failed one leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from pipelines.config import to_dict
from pipelines.errors import UserError
from pipelines.page import write_index
from pipelines.rundir import RunDir, new_folder
from pipelines.runtime import UMASK, command_line, pick_device, write_yaml

from .config import ExportConfig, ThreeDConfig
from .fit import export_asset, load_asset
from .renderer import make_renderer

logger = logging.getLogger(__name__)


def main(cfg: ExportConfig, run_dir: Path, progress: bool = True) -> Path:
    run = RunDir.existing(run_dir, "3d")
    full = run.resumed(ThreeDConfig, {**cfg.chosen(), "device": cfg.device})  # the run's, with the export options given
    device = pick_device(cfg.device)
    asset = load_asset(run.path, full, device)  # a damaged file fails here, in one line, before anything is written
    stem = f"export-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".partial", dir=run.path))
    except OSError as e:
        raise UserError(f"cannot write an export into {run.path}: {e.strerror}") from None
    folder = None
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700; the export is readable like the run's other folders
        export_asset(asset, make_renderer(device, full.render, full.field.bound), full, tmp, progress)
        write_yaml(tmp / "config.yaml", {**to_dict(full.export), "device": cfg.device, "command": command_line()})
        folder = new_folder(run.path, stem, "export", sep="~")  # claimed, empty
        os.replace(tmp, folder)  # onto the empty folder we own: atomic, and no other export can take the name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # claimed, but the rename did not happen
        raise
    write_index(folder, "export")
    run.write_index()  # the run's page links its exports
    logger.info("exported to %s", folder)
    return folder
