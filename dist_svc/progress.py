"""Progress on a terminal (a bar with bytes/s and ETA) or as plain log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


_drawn: list["Progress"] = []  # progress bars on the screen now


def say(line: str) -> None:
    """A line for the user on stderr. While a progress bar is drawn there, the line goes above
    it (tqdm clears the bar, writes, redraws): written beside the bar, it would be glued into it."""
    bars = [p for p in _drawn if p.stream is sys.stderr]
    if bars:
        bars[-1].bar.write(line, file=sys.stderr)
    else:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Progress:
    """Counts output bytes and units; `mode` is 'bar', 'log' or 'off' ('auto': bar on a terminal).
    Bytes advance within a unit as its blocks are done (`add`), so that a large tensor shows
    progress; its unit counts when it is recorded (`advance` with the rest of its bytes).

    The bytes shown are this run's: a resumed merge's bar goes from 0 to 100% over what is
    left (the largest tensors run first, so an earlier run's share of the bytes is mostly done
    while many small tensors may be left); the tensor count is the merge's."""

    def __init__(self, total_bytes: int, total_units: int, done_bytes: int = 0, done_units: int = 0,
                 mode: str = "auto", stream: TextIO | None = None, log_every: float = 5.0):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.total_bytes, self.total_units = total_bytes - done_bytes, total_units
        self.bytes, self.units = 0, done_units
        self.earlier = done_units  # tensors an earlier run finished
        self.start = self.last_log = time.monotonic()
        self.log_every = log_every
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="merge", file=self.stream, dynamic_ncols=True, smoothing=0.1,
                            postfix=self._count())
            _drawn.append(self)

    def _count(self) -> str:
        return f"{self.units}/{self.total_units} tensors" + (f" ({self.earlier} done earlier)" if self.earlier else "")

    def advance(self, nbytes: int) -> None:
        """A unit is done; `nbytes` of its bytes were not `add`ed yet."""
        self.units += 1
        self.add(nbytes)

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.set_postfix_str(self._count(), refresh=False)
            self.bar.update(nbytes)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last_log >= self.log_every or self.units == self.total_units:
                self.last_log = now
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        left = self.total_bytes - self.bytes
        eta = human_seconds(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        of = " left" if self.earlier else ""
        return (f"merge: {self._count()}, {human_bytes(self.bytes)}/{human_bytes(self.total_bytes)}{of} "
                f"({pct:.0f}%), {human_bytes(rate)}/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            _drawn.remove(self)
