"""The progress display shared by the command-line tools (tiled inference, training).

On a terminal the line is redrawn in place (carriage return). When the stream is not a terminal (a
log file, a pipe, a batch system's output), every update that is shown is a line of its own, at a
bounded rate: the first one, then at most one every `interval` seconds (or every `every` steps, when
given), and always the final one. A log therefore grows by a bounded number of lines and never
holds carriage returns.
"""
import math
import sys
import time
from typing import Callable, Optional

# Seconds between two lines when the output is not a terminal (redraws on a terminal: `tty_interval`).
LOG_INTERVAL = 10.0
TTY_INTERVAL = 0.25


def format_seconds(s: float) -> str:
    """1:05, 1:02:03; '?' for an unknown time."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60) if s >= 3600 else "%d:%02d" % (s // 60, s % 60)


class Progress:
    """A progress display of `total` units of work (tiles, steps).

    update(done, info) reports that `done` units are finished (counted from 0, so a resumed run
    passes start=units finished before it and its rate counts only this run's work); close() ends
    the display. Nothing is shown when enabled is False, nor before `delay` seconds have passed
    (except the final line of a display that was shown). `stream` defaults to sys.stderr at the time
    of each write; `tty` (default: stream.isatty()) selects redraws or lines."""

    def __init__(self, total: int, *, label: str = "", unit: str = "", start: int = 0, enabled: bool = True,
                 stream=None, tty: Optional[bool] = None, delay: float = 0.0, interval: Optional[float] = None,
                 every: int = 0, width: int = 24, clock: Callable[[], float] = time.monotonic):
        self.total, self.start, self.label, self.unit = int(total), int(start), label, unit
        self.enabled, self._stream, self.delay, self.every, self.width = enabled, stream, delay, int(every), width
        self.clock = clock
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (TTY_INTERVAL if self.tty else LOG_INTERVAL)
        self.t0 = clock()
        self.last_t = -math.inf
        self.last_done = None
        self.shown = False      # a line (or a redraw) was written
        self.open_line = False  # a terminal redraw waits for its newline

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def _due(self, done: int, now: float) -> bool:
        if done == self.last_done:
            return False
        if done >= self.total:
            return self.shown or now - self.t0 >= self.delay
        if now - self.t0 < self.delay:
            return False
        if not self.tty and self.every > 0:
            return (done - self.start) % self.every == 0
        return now - self.last_t >= self.interval

    def line(self, done: int, info: str = "", now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        el = now - self.t0
        frac = min(max(done / self.total, 0.0), 1.0) if self.total > 0 else 1.0
        rate = (done - self.start) / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else (0.0 if done >= self.total else float("nan"))
        fill = int(self.width * frac)
        parts = [self.label] if self.label else []
        parts.append("[%s%s] %d/%d%s %5.1f%%" % ("#" * fill, "-" * (self.width - fill), done, self.total,
                                                (" " + self.unit) if self.unit else "", 100 * frac))
        if info:
            parts.append(info)
        parts.append("%s %s/s, %s elapsed, eta %s" % ("%.3g" % rate if rate < 1000 else "%.0f" % rate,
                                                     self.unit or "it", format_seconds(el), format_seconds(eta)))
        return " ".join(parts)

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not self._due(done, now):
            return
        self.last_t, self.last_done, self.shown = now, done, True
        text = self.line(done, info, now)
        s = self.stream
        if self.tty:
            s.write("\r\x1b[K" + text)
            self.open_line = True
            if done >= self.total:
                s.write("\n")
                self.open_line = False
        else:
            s.write(text + "\n")
        s.flush()

    def close(self) -> None:
        """End the display: the terminal line gets its newline."""
        if self.enabled and self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False
