"""Progress of a long loop: tqdm's bar on a terminal, a plain line every so often anywhere else (a
log file, a pipe, CI), with the part of tqdm's interface the training loop and benchmarks use.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["LineProgress", "line_interval", "progress"]


def line_interval(total: int, lines: int = 20) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that prints at most about `lines` lines over `total` updates."""
    want = max(1, math.ceil(total / max(lines, 1)))
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= want:
                return step * scale
        scale *= 10


class LineProgress:
    """A line `desc: n/total unit (pct%), elapsed s, postfix` every `every` updates and at close."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", file: TextIO | None = None,
                 every: int | None = None, lines: int = 20):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file if file is not None else sys.stderr
        self.every = every if every is not None else line_interval(total - initial, lines)
        self.postfix = ""
        self._start = time.time()
        self._printed = None  # the count of the last printed line

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every:
            self._print()

    def _print(self) -> None:
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""  # 100% only at the end
        head = f"{self.desc}: " if self.desc else ""
        tail = f", {self.postfix}" if self.postfix else ""
        self.file.write(f"{head}{self.n}/{self.total} {self.unit}{pct}, {time.time() - self._start:.0f} s{tail}\n")
        self.file.flush()
        self._printed = self.n

    def close(self) -> None:
        if self._printed != self.n:
            self._print()


class _Silent:
    """What `progress(..., disable=True)` returns: the same interface, nothing shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "it", file: TextIO | None = None,
             disable: bool = False, lines: int = 20):
    """tqdm's bar when `file` (default stderr) is a terminal, a `LineProgress` otherwise; with
    `disable`, an object of the same interface that shows nothing."""
    if disable:
        return _Silent()
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc or None, unit=unit, file=file, dynamic_ncols=True)
    return LineProgress(total, initial=initial, desc=desc, unit=unit, file=file, lines=lines)
