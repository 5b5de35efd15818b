"""Dynamic loss scaling with DeeperSpeed ``eb7f5cff``'s two rule sets, written from its source.

State: ``scale``, ``hysteresis`` (the counter, refilled to ``delayed_shift``), ``cur_iter`` (every
``update`` call, skipped or not) and ``last_overflow_iter`` (-1 at start). ``rules`` picks the rules:

``"dynamic_loss_scaler"`` — ZeRO stage 1 (``deepspeed/runtime/fp16/loss_scaler.py``
``DynamicLossScaler.update_scale`` ~146-165), every Pythia size from 70m:
  * overflow: if the counter is 1 (or hysteresis is off) the scale halves, never below ``min_scale``;
    otherwise the counter drops by one and the scale stays. ``last_overflow_iter`` = this iteration.
    If the scale would halve but already *is* ``min_scale``, DeepSpeed raises
    (``raise_error_at_min_scale``, default True, ~154-156): so does this class
    (``LossScaleAtMinimum``), before changing anything.
  * no overflow: if ``(cur_iter - last_overflow_iter) % window == 0`` the scale doubles and the counter
    is refilled. The window therefore counts from the last overflow (from iteration -1 at start, so
    the first doubling comes on the 1000th good step), and a doubling repeats every ``window`` steps.
    With ``consecutive_hysteresis`` off (DeepSpeed's default, and Pythia's) the counter is refilled
    only at a doubling, never by a single good step.

``"fp16_optimizer"`` — ZeRO stage 0, i.e. 14m and 31m (``deepspeed/runtime/fp16/fused_optimizer.py``
``FP16_Optimizer._update_scale`` ~363-393):
  * overflow: the scale halves on every overflow (no hysteresis), never below ``min_scale``; no error
    at the minimum (FP16_Optimizer has none: it keeps skipping).
  * no overflow: doubles when ``stable = cur_iter - last_overflow_iter - 1`` is positive and a multiple
    of ``window`` — one good step later than the stage-1 rule.

``cur_iter`` advances in both cases and under both rule sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrace.errors import RetraceError

SCALER_RULES = ("dynamic_loss_scaler", "fp16_optimizer")


class LossScaleAtMinimum(RetraceError):
    """A gradient overflow with the loss scale already at its minimum: DeepSpeed stops the run here."""

    def __init__(self, message: str, *, scale: float, step: int | None = None):
        super().__init__(message)
        self.scale = scale
        self.step = step


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
    rules: str = "dynamic_loss_scaler"
    raise_at_min: bool = True  # DynamicLossScaler's raise_error_at_min_scale

    def __post_init__(self) -> None:
        if self.hysteresis < 0:
            self.hysteresis = self.delayed_shift
        if self.rules not in SCALER_RULES:
            raise RetraceError(f"loss scaler rules must be one of {', '.join(SCALER_RULES)}, got {self.rules!r}")

    @classmethod
    def static(cls, scale: float = 1.0) -> LossScaler:
        return cls(scale=scale, dynamic=False)

    def update(self, overflow: bool) -> None:
        """One optimizer step's update (applied or skipped). Raises ``LossScaleAtMinimum`` where
        DeepSpeed's DynamicLossScaler raises, leaving the state untouched."""
        if not self.dynamic:
            self.cur_iter += 1
            return
        if self.rules == "fp16_optimizer":
            self._update_fp16_optimizer(overflow)
        else:
            self._update_dynamic(overflow)
        self.cur_iter += 1

    def _update_dynamic(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.hysteresis == 1:
                if self.scale == self.min_scale and self.raise_at_min:
                    raise LossScaleAtMinimum(
                        f"gradient overflow with the loss scale already at its minimum ({self.min_scale:g}); "
                        "DeepSpeed stops the run here (DynamicLossScaler: 'Current loss scale already at "
                        "minimum')", scale=self.scale)
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

    def _update_fp16_optimizer(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self.last_overflow_iter = self.cur_iter
        else:
            stable = (self.cur_iter - self.last_overflow_iter) - 1
            if stable > 0 and stable % self.window == 0:
                self.scale *= self.factor

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, type(getattr(self, k))(v))
