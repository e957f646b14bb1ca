"""The run's wall clock: seconds trained over every session, the ``train.max_minutes``
deadline, and the schedule position a budget implies.

A run resumed from a checkpoint keeps counting from the seconds it had trained
(``RunClock(seconds_before=...)``). With a budget the schedules (learning rate,
adversarial warm-up and ramp) follow the larger of the epochs done and the share of the
budget used, so a short budget still walks its whole schedule before the clock ends it.
Under DDP every rank must act on the same position (whether the critic trains and the
unlabelled batch is drawn are decided from it, and both involve collectives), so there the
trainer agrees on the share used at its periodic sync (:attr:`RunClock.agreed_used`) and the
schedules read that instead of each rank's own clock.
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
        # DDP: the share of the budget used, as agreed by every rank at the last sync; None = this clock's own
        self.agreed_used: float | None = None

    def start(self, deadline: float | None, budget_s: float | None, agreed: bool = False) -> None:
        """``agreed``: the schedules read :attr:`agreed_used` (DDP), from 0 until the first sync."""
        self.seconds_before, self._started = self.seconds(), time.monotonic()
        self.deadline, self.budget_s = deadline, budget_s
        self.agreed_used = 0.0 if agreed else None

    def seconds(self) -> float:
        """Wall-clock seconds trained so far, over every session of the run."""
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self.seconds_before + running

    def used(self) -> float:
        """The share of the budget this process has used, in [0, 1] (0 without a budget)."""
        if self.deadline is None or not self.budget_s:
            return 0.0
        return min(max(1 - (self.deadline - time.monotonic()) / self.budget_s, 0.0), 1.0)

    def schedule_epoch(self, epoch: float, epochs: int) -> float:
        """The epoch the schedules act on: ``epoch``, or with a budget the share of it used
        times ``epochs`` when that is further along."""
        if self.deadline is None or not self.budget_s:
            return epoch
        used = self.agreed_used if self.agreed_used is not None else self.used()
        return max(epoch, used * epochs)

    def past_deadline(self) -> bool:
        """This process's view only; the trainer agrees on it across DDP ranks."""
        return self.deadline is not None and time.monotonic() > self.deadline
