"""When a monitor measures: every ``n`` steps, or as often as a share of training time pays.

A monitor constructed with ``every_n_steps=n`` measures at the first step its probe is
complete and then at every multiple of ``n`` (:class:`FixedSchedule`). Without it, it keeps
to an overhead budget (:class:`BudgetSchedule`): the seconds it spends measuring (and
publishing what it measured: loggers, figures) stay at most ``max_overhead`` times the
seconds the run spends training. Both know nothing of Lightning:
the monitor feeds them steps and seconds.

The budget places each next measurement where the training time will have paid for it.
After a measurement at step ``s`` that took ``c`` seconds, with ``S`` seconds spent
measuring and ``T`` seconds trained so far (this monitor's and every other monitor's
measurements left out of ``T``) at ``τ = T / s`` seconds per step, the next measurement of
about the same cost fits the budget once ``(S + c) / max_overhead`` seconds have been
trained, that is ``⌈((S + c) / max_overhead − T) / τ⌉`` steps later; when that step comes
and the training time has not paid for it after all (the pace changed: the first steps of a
run are often slower or faster than the rest), the measurement is placed again at the pace
seen since. It is never sooner
than ``⌈growth · s⌉`` steps later either, so measurements are dense early, where training
changes fastest, and grow sparser geometrically (``growth = 0.1``: about 24 per decade of
steps) however cheap they are. The first measurement comes as soon as the probe is complete
(step 0 by default), whatever it costs: on a short run it can take more than the share, and
the schedule waits until training has paid for it.

Every decision is a function of the step and of the recorded seconds, which are reduced
over processes (their maximum) when the measurement is recorded, so every process of a DDP
run takes the same decision; the schedule's state goes into checkpoints, so a resumed run
continues where the interrupted one stood. A checkpoint of a fixed schedule resumed under
the budget holds no decision: the budget takes one at the first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MAX_OVERHEAD", "GROWTH", "BudgetSchedule", "FixedSchedule"]

#: The share of training time a monitor without ``every_n_steps`` may spend measuring.
DEFAULT_MAX_OVERHEAD = 0.05
#: Measurements are at least this fraction of the current step apart (geometric spacing).
GROWTH = 0.1
#: Seconds still owed, relative to those trained, that count as paid (float rounding).
PAID_TOLERANCE = 1e-9


@dataclass
class FixedSchedule:
    """Every ``every_n_steps`` optimizer steps, and at the first step the probe allows."""

    every_n_steps: int

    def due(self, step: int, last_step: int | None, trained: Callable[[], float]) -> bool:
        if last_step is None:
            return True
        return step != last_step and step % self.every_n_steps == 0

    def record(self, step: int, cost: float, trained: float) -> None:
        """Nothing to decide: the schedule is fixed."""

    def add(self, cost: float) -> None:
        """Nothing to decide: the schedule is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class BudgetSchedule:
    """At most ``max_overhead`` of the training time in measurements (module docstring).

    Attributes:
        max_overhead: The share, in ``(0, 1)``.
        growth: Least gap between measurements as a fraction of the step measured last.
        next_step: The step of the next measurement (``None`` while undecided).
        decide_at: The step at which to place the next measurement, when the last one came
            before any training was timed (the pace is not known yet).
        spent: Seconds spent in this monitor's measurements.
        last_cost: Seconds of the last measurement, the expected cost of the next.
        last_step: The step of the last measurement.
    """

    max_overhead: float = DEFAULT_MAX_OVERHEAD
    growth: float = GROWTH
    next_step: int | None = None
    decide_at: int | None = None
    spent: float = 0.0
    last_cost: float = 0.0
    last_step: int | None = None

    def due(self, step: int, last_step: int | None, trained: Callable[[], float]) -> bool:
        """Whether to measure at ``step``; ``trained()`` (the seconds trained so far, the
        same on every process) is asked for only when the schedule has a decision to take."""
        if last_step is None:
            return True
        if self.decide_at is not None and step >= self.decide_at:
            self._place(step, trained())
        if self.next_step is None or step == last_step or step < self.next_step:
            return False
        # The step was placed at the pace known then (early steps are slower or faster than
        # later ones): measure only if the training time has paid for it by now, else place
        # it again at the pace seen since.
        now_trained = trained()
        if self.owed(now_trained) > PAID_TOLERANCE * now_trained:
            self._place(step, now_trained)
            return step >= self.next_step
        return True

    def record(self, step: int, cost: float, trained: float) -> None:
        """A measurement at ``step`` took ``cost`` seconds, with ``trained`` seconds of
        training so far: place the next one (the same numbers on every process)."""
        self.spent += cost
        self.last_cost = cost
        self.last_step = step
        self.next_step = None
        if step == 0 or trained <= 0:  # no pace known yet: decide after the next step
            self.decide_at = step + 1
        else:
            self._place(step, trained)

    def add(self, cost: float) -> None:
        """``cost`` more seconds spent after the last measurement was recorded (publishing
        it): spent, and expected of the next measurement too; the check when the placed
        step comes counts them."""
        self.spent += cost
        self.last_cost += cost

    def _place(self, now: int, trained: float) -> None:
        """The next measurement, decided at step ``now`` with ``trained`` seconds trained."""
        seconds_per_step = trained / now if now > 0 else 0.0
        if seconds_per_step <= 0:  # still no training timed: decide a step later
            self.next_step, self.decide_at = None, now + 1
            return
        owed = self.owed(trained)
        paid_at = now
        if owed > 0 and seconds_per_step > 0:
            paid_at = now + math.ceil(owed / seconds_per_step)
        last = self.last_step or 0
        self.next_step = max(last + max(1, math.ceil(self.growth * last)), paid_at)
        self.decide_at = None

    def owed(self, trained: float) -> float:
        """Seconds of training still to come before the next measurement fits the budget."""
        return (self.spent + self.last_cost) / self.max_overhead - trained

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_step": self.next_step,
            "decide_at": self.decide_at,
            "spent": self.spent,
            "last_cost": self.last_cost,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = state.get("next_step")
        # A fixed schedule's state (a run resumed without every_n_steps) holds no decision:
        # take one at the first step (no costs known: measure soon).
        self.decide_at = state.get("decide_at", None if "next_step" in state else 0)
        self.spent = float(state.get("spent", 0.0))
        self.last_cost = float(state.get("last_cost", 0.0))
        self.last_step = state.get("last_step")
