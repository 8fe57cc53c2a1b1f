"""`python run.py export RUN_DIR [key=value ...]`: export a 3d run again with other mesh or turntable
settings (resolution, iso-level, formats), from its final field or, for an unfinished run, its last
checkpoint. Options not given keep the run's own values. The files go to a new folder RUN_DIR/export-<time>/; nothing of the run is overwritten."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from pipelines.config import build, job_defaults, load_yaml, to_dict
from pipelines.errors import UserError
from pipelines.runtime import command_line, pick_device, write_yaml

from .config import ExportConfig, ThreeDConfig
from .fit import export_asset, load_asset
from .renderer import make_renderer

logger = logging.getLogger(__name__)


def main(cfg: ExportConfig, run_dir: Path, progress: bool = True) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a 3d run directory (no config.yaml)")
    saved = load_yaml(run_dir / "config.yaml")
    saved.pop("prompt", None), saved.pop("command", None)
    # the run's own export settings, except those this command sets
    defaults = to_dict(job_defaults(ExportConfig, "export"))
    chosen = {k: v for k, v in to_dict(cfg).items() if v != defaults.get(k) and k in ThreeDConfig.__dataclass_fields__}
    full = build(ThreeDConfig, {**saved, **chosen})
    full.validate()
    device = pick_device(cfg.device)
    asset = load_asset(run_dir, full, device)  # fails before anything is written
    folder = run_dir / f"export-{datetime.now():%Y%m%d-%H%M%S}"
    for i in range(2, 1000):
        if not folder.exists():
            break
        folder = folder.with_name(f"{folder.name.split('~')[0]}~{i}")
    tmp = folder.with_name(f".{folder.name}.partial")
    tmp.mkdir(parents=True)
    try:
        export_asset(asset, make_renderer(device, full, full.bound), full, tmp, progress)
        write_yaml(tmp / "config.yaml", {**to_dict(cfg), "command": command_line()})
        tmp.rename(folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported to %s", folder)
    return folder
