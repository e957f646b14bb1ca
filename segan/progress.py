"""Progress and log output on stderr, for terminals and for batch jobs alike.

One helper for every long loop (training steps and epochs, prediction cases, preprocessing,
sweep children): on a terminal a tqdm bar redraws in place; when stderr is a file or a pipe
(SLURM, CI, ``> log 2>&1``) there are no ``\\r`` redraws and no bars, only whole lines, one
per finished unit (an epoch, a case), each with its seconds and an ETA.

:func:`configure_logging` (``segan -v``) decides whether MLflow's INFO chatter
("Creating initial MLflow database tables...", alembic migrations, "View run ... at")
reaches the user.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

# MLflow reads its level when it is imported, and prints run URLs to stdout unless told not to.
_MLFLOW_ENV = {"MLFLOW_LOGGING_LEVEL": ("WARNING", "INFO"),
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": ("true", "false")}
_SET: dict[str, str] = {}  # what configure_logging exported (a later call may change it; the user's stays)


def is_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or a stream without a file descriptor
        return False


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``2 h 07 min``: short and unambiguous in a log."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Progress over ``total`` units on stderr (also a context manager).

    Args:
        total: number of units (steps, epochs, cases).
        desc: what is counted, the prefix of the bar and of every line (``"epoch"``, ``"predict"``).
        unit: the bar's unit name.
        enabled: ``False`` writes nothing at all (other ranks, ``train.progress=false``).
        bar: draw a tqdm bar when stderr is a terminal.
        lines: write one line per :meth:`done` wherever no bar is drawn (always, when ``bar`` is off).
        initial: units already done before this session (a resumed training run).
        deadline: ``time.monotonic()`` value by which the loop stops anyway (a wall-clock
            budget); the ETA is never later than it.
        stream: where to write (default ``sys.stderr``, looked up when created).

    ``bar=True, lines=False``: a bar on a terminal, silence in a log (training steps).
    ``bar=True, lines=True``: a bar on a terminal, one line per case in a log (prediction).
    ``bar=False, lines=True``: one line per unit everywhere (training epochs, sweep children).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool = True, bar: bool = True,
                 lines: bool = True, initial: int = 0, deadline: float | None = None,
                 stream: IO | None = None, leave: bool = False) -> None:
        self.total, self.desc, self.deadline = int(total), desc, deadline
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.count = self._start_count = int(initial)
        self._bar = None
        if enabled and bar and is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.count, desc=desc, unit=unit, leave=leave,
                             dynamic_ncols=True, mininterval=1.0, file=self.stream)
        self.lines = enabled and lines and self._bar is None
        self._start = self._last = time.monotonic()

    # ------------------------------------------------------------------ units
    def update(self, n: int = 1, postfix: dict[str, Any] | None = None) -> None:
        """Advance by ``n`` units without writing a line (a bar redraws, at most once a second)."""
        self.count += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def done(self, message: str = "", seconds: float | None = None) -> None:
        """One unit finished: the bar advances, or one line is written:
        ``<desc> <i>/<total>: <message>, <seconds>, ETA <time>``.

        ``seconds`` defaults to the time since the previous unit finished.
        """
        now = time.monotonic()
        elapsed = now - self._last if seconds is None else seconds
        self._last = now
        self.update(1)
        if not self.lines:
            return
        parts = [f"{self.desc} {self.count}/{self.total}:" + (f" {message}" if message else ""),
                 format_seconds(elapsed)]
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        self._print(", ".join(parts))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the mean pace of this session's units (capped by the deadline);
        ``None`` before the first unit or after the last."""
        now = time.monotonic() if now is None else now
        done, left = self.count - self._start_count, self.total - self.count
        if done <= 0 or left <= 0:
            return None
        eta = (now - self._start) / done * left
        if self.deadline is not None:
            eta = max(min(eta, self.deadline - now), 0.0)
        return eta

    def write(self, message: str) -> None:
        """A line that always shows (a warning, a failure), above the bar on a terminal."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self._print(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _print(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


def track(iterable, total: int, desc: str, unit: str = "it", **kwargs: Any):
    """Yield from ``iterable`` while a :class:`Progress` counts it (``kwargs`` go to Progress)."""
    with Progress(total, desc, unit, **kwargs) as progress:
        for item in iterable:
            yield item
            progress.done()


def configure_logging(verbose: bool = False) -> None:
    """Quiet by default: MLflow (and the alembic migrations it runs) shows warnings and errors
    only and prints no run URLs; ``verbose`` shows MLflow's INFO lines and segan's own.

    Values the user exported (``MLFLOW_LOGGING_LEVEL``, ...) are kept. Works before and after
    MLflow is imported, and child processes inherit it through the environment.
    """
    for key, (quiet, loud) in _MLFLOW_ENV.items():
        if key not in os.environ or os.environ[key] == _SET.get(key):
            os.environ[key] = _SET[key] = loud if verbose else quiet
    if "mlflow" in sys.modules:  # MLflow set its level from the environment at import: adjust it
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    if verbose:
        segan_log = logging.getLogger("segan")
        if not segan_log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            segan_log.addHandler(handler)
        segan_log.setLevel(logging.INFO)
