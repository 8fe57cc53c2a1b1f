"""index.html: a run folder's own page, opened from disk with no server and no network.

It shows what the folder holds: images and GIFs, videos (with controls), mesh downloads (a 4d run's per-frame
meshes too), the training views of a 3D fit, links to the nested runs of an eval, then the prompt, the config and the metadata. Every link is relative
and nothing is fetched from elsewhere: no scripts, no web fonts, the style inline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

import yaml

from .runtime import write_text

IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
VIDEOS = (".mp4", ".webm")
MESHES = (".glb", ".obj", ".mtl", ".ply")
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #666; } figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { color: #666; font-size: 0.85em; } img, video { max-width: 100%; image-rendering: auto; }
.thumbs img { max-height: 256px; } pre { background: #f5f5f5; padding: 1em; overflow: auto; font-size: 13px; }
a.file { display: inline-block; margin: 0 1em 0.4em 0; }
"""


def _link(path: Path, root: Path) -> str:
    return html.escape(quote(path.relative_to(root).as_posix()), quote=True)


def _figure(path: Path, root: Path) -> str:
    src, name = _link(path, root), html.escape(path.name)
    if path.suffix.lower() in VIDEOS:
        body = f'<video src="{src}" controls loop muted playsinline preload="metadata"></video>'
    else:
        body = f'<a href="{src}"><img src="{src}" alt="{name}" loading="lazy"></a>'
    return f"<figure>{body}<figcaption>{name}</figcaption></figure>"


def render_index(root: Path, job: str) -> str:
    """The page for run folder `root` of job `job`, from the files it holds now."""
    root = Path(root)
    config_text = (root / "config.yaml").read_text(encoding="utf-8") if (root / "config.yaml").is_file() else ""
    metadata = json.loads((root / "metadata.json").read_text(encoding="utf-8")) if (root / "metadata.json").is_file() else {}
    saved = yaml.safe_load(config_text) if config_text else {}
    prompt = str(metadata.get("prompt") or (saved.get("prompt") if isinstance(saved, dict) else None) or "")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name != "index.html")
    media = [p for p in files if p.suffix.lower() in IMAGES + VIDEOS]
    meshes = [p for p in files if p.suffix.lower() in MESHES] + sorted((root / "frames").glob("frame_*.ply"))  # 4d
    views = sorted((root / "val").glob("*.png")) if (root / "val").is_dir() else []
    nested = sorted(p.parent for p in [*root.glob("*/index.html"), *root.glob("*/*/index.html")])  # exports, evals
    others = [p for p in files if p not in media and p not in meshes and p.name not in ("config.yaml", "metadata.json")]

    title = prompt or f"{job} run"
    facts = [job, root.name]
    for key in ("model", "seed", "device"):
        if metadata.get(key) is not None:
            facts.append(f"{key} {metadata[key]}")
    if isinstance(metadata.get("timings_s"), dict):
        facts.append(f"{sum(v for v in metadata['timings_s'].values() if isinstance(v, (int, float))):.0f} s")
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(" · ".join(map(str, facts)))}</p>']
    if not metadata:
        parts.append('<p class="meta">No metadata.json yet: the run has not finished (an interrupted 3D fit resumes '
                     f"with <code>--resume {html.escape(str(root))}</code>).</p>")
    if media:
        parts += ["<h2>Outputs</h2>", "".join(_figure(p, root) for p in media)]
    if meshes:
        parts += ["<h2>Meshes</h2>", "".join(f'<a class="file" href="{_link(p, root)}" download>{html.escape(p.name)}</a>'
                                             for p in meshes)]
    if views:
        parts += ["<h2>Training views</h2>", '<div class="thumbs">' + "".join(_figure(p, root) for p in views) + "</div>"]
    if nested:
        parts += ["<h2>Runs</h2>", "<ul>" + "".join(f'<li><a href="{_link(p / "index.html", root)}">'
                                                    f"{html.escape(p.relative_to(root).as_posix())}</a></li>"
                                                    for p in nested) + "</ul>"]
    if others:
        parts += ["<h2>Files</h2>", "".join(f'<a class="file" href="{_link(p, root)}">{html.escape(p.name)}</a>'
                                            for p in others)]
    if config_text:
        parts += ["<h2>config.yaml</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    if metadata:
        parts += ["<h2>metadata.json</h2>", f"<pre>{html.escape(json.dumps(metadata, indent=2))}</pre>"]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_index(root: Path, job: str) -> Path:
    write_text(Path(root) / "index.html", render_index(root, job))
    return Path(root) / "index.html"
