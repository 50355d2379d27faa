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


class Progress:
    """Counts output bytes and units; `mode` is 'bar', 'log' or 'off' ('auto': bar on a terminal).
    Bytes advance within a unit as its blocks are done (`add`), so that a large tensor shows
    progress; its unit counts when it is recorded (`advance` with the rest of its bytes)."""

    def __init__(self, total_bytes: int, total_units: int, done_bytes: int = 0, done_units: int = 0,
                 mode: str = "auto", stream: TextIO | None = None, log_every: float = 5.0):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.total_bytes, self.total_units = total_bytes, total_units
        self.bytes, self.units = done_bytes, done_units
        self.start_bytes = done_bytes
        self.start = self.last_log = time.monotonic()
        self.log_every = log_every
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="merge", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def advance(self, nbytes: int) -> None:
        """A unit is done; `nbytes` of its bytes were not `add`ed yet."""
        self.units += 1
        self.add(nbytes)

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.units}/{self.total_units} tensors", refresh=False)
            self.bar.update(nbytes)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last_log >= self.log_every or self.units == self.total_units:
                self.last_log = now
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.bytes - self.start_bytes) / elapsed
        left = self.total_bytes - self.bytes
        eta = human_seconds(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"merge: {self.units}/{self.total_units} tensors, {human_bytes(self.bytes)}/"
                f"{human_bytes(self.total_bytes)} ({pct:.0f}%), {human_bytes(rate)}/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
