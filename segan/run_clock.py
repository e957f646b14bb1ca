"""The run's wall clock: seconds trained over every session, the ``train.max_minutes``
deadline, and the schedule position a budget implies.

A run resumed from a checkpoint keeps counting from the seconds it had trained
(``RunClock(seconds_before=...)``). With a budget the schedules (learning rate,
adversarial warm-up and ramp) follow the larger of the epochs done and the share of the
budget used, so a short budget still walks its whole schedule before the clock ends it.
"""

from __future__ import annotations

import time


class RunClock:
    """``start(deadline, budget_s)`` when training (re)starts; ``deadline`` is a
    :func:`time.monotonic` time or ``None`` (no budget)."""

    def __init__(self, seconds_before: float = 0.0) -> None:
        self.seconds_before = float(seconds_before)
        self.deadline: float | None = None
        self.budget_s: float | None = None
        self._started: float | None = None

    def start(self, deadline: float | None, budget_s: float | None) -> None:
        self.seconds_before, self._started = self.seconds(), time.monotonic()
        self.deadline, self.budget_s = deadline, budget_s

    def seconds(self) -> float:
        """Wall-clock seconds trained so far, over every session of the run."""
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self.seconds_before + running

    def schedule_epoch(self, epoch: float, epochs: int) -> float:
        """The epoch the schedules act on: ``epoch``, or with a budget the share of it used
        times ``epochs`` when that is further along."""
        if self.deadline is None or not self.budget_s:
            return epoch
        used = 1 - (self.deadline - time.monotonic()) / self.budget_s
        return max(epoch, min(used, 1.0) * epochs)

    def past_deadline(self) -> bool:
        """This process's view only; the trainer agrees on it across DDP ranks."""
        return self.deadline is not None and time.monotonic() > self.deadline
