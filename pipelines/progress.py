"""Progress bars for long loops, and the two hooks a front end needs: where a job is, and a Cancel.

Every long loop iterates a `Bar` (a tqdm bar). Inside `watch(report, stop)`, each bar of this thread also calls
`report(desc, done, total)`, and raises `Cancelled` at its next step once `stop` is set. `Cancelled` is a
KeyboardInterrupt, so a cancelled job takes exactly the path Ctrl-C takes: a fresh run folder is removed, and a
3D fit saves a checkpoint to resume from.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from tqdm.auto import tqdm

Report = Callable[[str, int, Optional[int]], None]


class Cancelled(KeyboardInterrupt):
    """A front end's Cancel, taken as a Ctrl-C."""


_hooks = threading.local()


@contextmanager
def watch(report: Report | None = None, stop: threading.Event | None = None) -> Iterator[None]:
    """Within this block, this thread's bars report to `report` and stop when `stop` is set."""
    saved = getattr(_hooks, "current", (None, None))
    _hooks.current = (report, stop)
    try:
        yield
    finally:
        _hooks.current = saved


def check_cancelled() -> None:
    """Raise Cancelled if this thread's job was asked to stop (for long steps that are not a bar's)."""
    stop = getattr(_hooks, "current", (None, None))[1]
    if stop is not None and stop.is_set():
        raise Cancelled("cancelled")


class Bar(tqdm):
    """tqdm, whose steps also reach the watching front end (even when the bar itself is not drawn)."""

    def __init__(self, iterable=None, desc: str = "", **kwargs):
        self.label = desc
        if kwargs.get("total") is None and hasattr(iterable, "__len__"):
            kwargs["total"] = len(iterable)
        super().__init__(iterable, desc=desc, **kwargs)

    def __iter__(self):
        report = getattr(_hooks, "current", (None, None))[0]
        done = getattr(self, "n", 0)
        for item in super().__iter__():
            if report is not None:
                report(self.label, done, self.total)
            check_cancelled()
            yield item
            done += 1
        if report is not None:
            report(self.label, done, self.total)
