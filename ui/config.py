"""Options of `python run.py ui` (torch- and gradio-free, for a fast --help)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import option
from pipelines.errors import UserError


@dataclass
class UIConfig:
    host: str = option("127.0.0.1", "address to serve on (0.0.0.0 opens the app to your network)")
    port: int = option(7860, "port to serve on")
    share: bool = option(False, "also open a public gradio.live link (sends the app through Gradio's servers)")

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise UserError(f"port must be between 1 and 65535, got {self.port}")
        if not self.host.strip():
            raise UserError("host is empty: use 127.0.0.1, or 0.0.0.0 for every address")
