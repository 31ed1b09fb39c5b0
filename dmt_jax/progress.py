"""Progress of long pieces of work (an evaluation pass, a conversion, the demo's data and teachers).

On a terminal: one live tqdm line with rate and ETA. In a log file, under SLURM or in a pipe: plain
lines, one when the work starts, then at most one every `every_s` seconds, and one at the end. Only
process 0 prints. `DMT_PROGRESS=bar|lines|off` overrides the choice.

    with Progress("k-NN bank", total=len(source), unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

`update(n, note="loss 0.412")` also shows a short status of the work (the latest is kept: beside the
bar, at the end of each line and of the last one).
"""

from __future__ import annotations

import os
import sys
import time


def _process_index() -> int:
    jax = sys.modules.get("jax")  # never import jax for this: a conversion does not need it
    try:
        return jax.process_index() if jax is not None else 0
    except Exception:  # jax imported but no backend yet
        return 0


def _mode(stream) -> str:
    mode = os.environ.get("DMT_PROGRESS", "").strip().lower()
    if mode in ("bar", "lines", "off"):
        return mode
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """A progress report for `total` units of work (None: unknown); use as a context manager."""

    def __init__(
        self, what: str, total: int | None = None, unit: str = "it", every_s: float = 30.0, stream=None
    ):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done, self.t0, self.note = 0, time.perf_counter(), ""
        self._last_line = self.t0
        self.mode = _mode(self.stream) if _process_index() == 0 else "off"
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=what, unit=unit, file=self.stream, dynamic_ncols=True, leave=True
            )
        elif self.mode == "lines":
            size = f" ({total:,} {unit})" if total else ""
            self._print(f"{what}: started{size}")

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
            if self._bar is not None:
                self._bar.set_postfix_str(note, refresh=False)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and time.perf_counter() - self._last_line >= self.every_s:
            self._print(self._status())

    def close(self, ok: bool = True) -> None:
        """Ends the report (a second close does nothing); ok=False: the work stopped short (an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self.t0
            note = f" ({self.note})" if self.note else ""
            ended = "done," if ok else "stopped after"
            self._print(f"{self.what}: {ended} {self.done:,} {self.unit} in {_clock(elapsed)}{note}")
        self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)

    def _status(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = f"{self.what}: {self.done:,}"
        if self.total:
            line += f"/{self.total:,} ({100 * self.done / self.total:.0f}%)"
        line += f" {self.unit}, {rate:,.1f} {self.unit}/s"
        if self.total and rate > 0:
            line += f", ETA {_clock((self.total - self.done) / rate)}"
        return line + (f" | {self.note}" if self.note else "")

    def _print(self, line: str) -> None:
        self._last_line = time.perf_counter()
        print(line, file=self.stream, flush=True)
