"""Dynamic loss scaling with DeepSpeed's (DeeperSpeed's) rules, written from the documented behaviour.

State: ``scale``, ``hysteresis`` (the counter, refilled to ``delayed_shift``), ``cur_iter`` (every
``update`` call, skipped or not) and ``last_overflow_iter`` (-1 at start).

``update(overflow)``, called once per optimizer step (applied or skipped):
  * overflow: if the counter is 1 (or hysteresis is off) the scale halves, never below ``min_scale``;
    otherwise the counter drops by one and the scale stays. ``last_overflow_iter`` = this iteration.
  * no overflow: if ``(cur_iter - last_overflow_iter) % window == 0`` the scale doubles and the counter
    is refilled. The window therefore counts from the last overflow (from iteration -1 at start, so
    the first doubling comes on the 1000th good step), and a doubling repeats every ``window`` steps.
    With ``consecutive_hysteresis`` off (DeepSpeed's default, and Pythia's) the counter is refilled
    only at a doubling, never by a single good step.
  * ``cur_iter`` advances in both cases.
At the minimum scale DeepSpeed may raise; we keep training at the minimum (and the log shows it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    scale: float = 4096.0
    window: int = 1000
    delayed_shift: int = 2  # DeepSpeed "hysteresis"
    min_scale: float = 1.0
    factor: float = 2.0
    dynamic: bool = True
    consecutive_hysteresis: bool = False
    hysteresis: int = -1  # current counter; -1 → delayed_shift
    cur_iter: int = 0
    last_overflow_iter: int = -1

    def __post_init__(self) -> None:
        if self.hysteresis < 0:
            self.hysteresis = self.delayed_shift

    @classmethod
    def static(cls, scale: float = 1.0) -> LossScaler:
        return cls(scale=scale, dynamic=False)

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            self.cur_iter += 1
            return
        if overflow:
            if self.delayed_shift == 1 or self.hysteresis == 1:
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis = self.delayed_shift
                self.scale *= self.factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, type(getattr(self, k))(v))
