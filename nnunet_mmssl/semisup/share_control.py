"""A weight set by the gradient share: the unsupervised weight that makes ``‖∇(w·L_u)‖ / ‖∇L_s‖`` equal a target.

A fixed ``unsupervised_weight`` means one thing at one patch size, loss reduction or data set and another elsewhere
(MemCif's term is 0.1 % of the gradient at the paper's weight, MMF-MCML's 5–11 %). :class:`ShareController` turns a
target share (e.g. 0.1: the unlabelled data move the weights a tenth as much as the labelled ones) into a weight,
online, from the shares the trainer measures (:mod:`nnunet_mmssl.semisup.gradient_share`).

The share is linear in the weight (``share = w · u`` with ``u = ‖∇L_u‖ / ‖∇L_s‖``, the *unit share*), so each
measurement ``s`` taken at the applied weight ``w_applied`` gives ``u = s / w_applied``. The controller keeps

* an exponential moving average ``ū`` of ``u`` (:attr:`ShareController.smoothing` for a new measurement; the first
  one initialises it). With :attr:`ShareController.averaging` ``"mean"`` (the default) the average is arithmetic, so
  the **mean** share over the measurements is the target; with ``"log"`` it is the average of ``log u`` (the rule
  before 2026-12-07), which holds the **geometric mean** (the median) at the target instead;
* the weight ``w``, moved in log space a fraction :attr:`ShareController.rate` of the way to ``target / ū`` per
  measurement, by at most a factor :attr:`ShareController.max_factor`, and kept within
  ``[min_weight, max_weight]``.

Why arithmetic: one measurement is one minibatch, and on real data the unit share scatters from batch to batch -- by
a factor of about 2 in a healthy MemCif run on BraTS, and bimodally in another (shares of about 0.0005 and of 1 to 5
alternating at nearly the same weight). Steering the geometric mean sets the weight by the silent batches: the
weight climbs and the batches that do carry the term get many times the target (that MemCif run at target 0.2, with
``"log"``: weight 26 and a mean share of 0.73 over its last 15 epochs, geometric mean 0.11;
``benchmarks/share_trajectories.py``). The arithmetic average holds the mean share -- how much the unlabelled term
moves the weights, on average, relative to the labelled one -- which is what the target promises. It follows a
trend more slowly at the same smoothing, so the ``_share*`` trainers measure often (every 2 iterations) and average
over about ten measurements (smoothing 0.1).

The trainer applies ``w · ramp(progress)`` (its ramp-up, :mod:`nnunet_mmssl.semisup.ramps`): since the controller
divides each measurement by the weight that was applied, the ramp scales the share (the measured share approaches
``target · ramp``) without being undone by the controller. Measurements that carry no information (NaN, inf, a zero
share or a zero applied weight) are skipped. Pure Python; the state is plain numbers (:meth:`state_dict`), stored in
the trainer's checkpoint.
"""

import math
from dataclasses import dataclass

#: the controller's averagings of the unit share (:attr:`ShareController.averaging`)
AVERAGING = ("mean", "log")


@dataclass
class ShareController:
    """Online weight of the unsupervised loss steering the measured gradient share to :attr:`target`.

    Args:
        target: the gradient share to reach (> 0).
        weight: the starting weight (clipped into the bounds), e.g. the method's paper weight.
        min_weight, max_weight: bounds of the weight (0 < min_weight <= max_weight).
        smoothing: weight of a new measurement in the moving average of the unit share, in (0, 1]
            (1 = no smoothing).
        rate: fraction of the log distance to the ideal weight covered per measurement, in (0, 1].
        max_factor: the weight changes by at most this factor per measurement (>= 1).
        averaging: ``"mean"`` (arithmetic moving average of the unit share: the mean share is the target) or
            ``"log"`` (moving average of its log: the geometric mean share is the target).
    """

    target: float
    weight: float
    min_weight: float = 1e-4
    max_weight: float = 100.0
    smoothing: float = 0.1
    rate: float = 0.5
    max_factor: float = 3.0
    averaging: str = "mean"
    #: the moving average ``ū`` of ``share / applied weight`` (arithmetic, or geometric with ``averaging="log"``);
    #: None before the first measurement
    unit_share: float | None = None
    #: measurements used so far
    updates: int = 0

    def __post_init__(self):
        _check(self.target, "target", "> 0", lambda v: v > 0, "e.g. 0.1 (a tenth of the supervised gradient)")
        _check(self.min_weight, "min_weight", "> 0", lambda v: v > 0, "e.g. 1e-4")
        _check(self.max_weight, "max_weight", ">= min_weight", lambda v: v >= self.min_weight,
               f"a bound >= min_weight {self.min_weight:g}")
        _check(self.smoothing, "smoothing", "in (0, 1]", lambda v: 0 < v <= 1, "e.g. 0.1")
        _check(self.rate, "rate", "in (0, 1]", lambda v: 0 < v <= 1, "e.g. 0.5")
        _check(self.max_factor, "max_factor", ">= 1", lambda v: v >= 1, "e.g. 3")
        _check(self.weight, "weight", "> 0", lambda v: v > 0, "the starting weight, e.g. the paper's")
        if self.averaging not in AVERAGING:
            raise ValueError(f"ShareController averaging {self.averaging!r}, must be one of {', '.join(AVERAGING)}. "
                             f"Use \"mean\" (the mean share is the target) or \"log\" (the geometric mean is).")
        self.weight = self._clip(float(self.weight))

    def _clip(self, weight: float) -> float:
        return min(max(weight, self.min_weight), self.max_weight)

    @property
    def ideal_weight(self) -> float | None:
        """``target / ū`` (unclipped), the weight the controller moves towards; None before any measurement."""
        if self.unit_share is None:
            return None
        return self.target / self.unit_share

    @property
    def smoothed_share(self) -> float | None:
        """The share the current weight gives at the averaged unit share (``weight · ū``); None before any
        measurement."""
        return None if self.unit_share is None else self.weight * self.unit_share

    def update(self, share: float, applied_weight: float) -> bool:
        """Take one measurement: ``share`` measured with ``applied_weight`` on the unsupervised loss.

        Returns:
            Whether the measurement was used (False for NaN/inf/non-positive shares or weights).
        """
        share, applied_weight = float(share), float(applied_weight)
        if not (math.isfinite(share) and math.isfinite(applied_weight) and share > 0 and applied_weight > 0):
            return False
        unit = share / applied_weight
        if not (math.isfinite(unit) and unit > 0):  # e.g. an overflow or underflow of the quotient
            return False
        if self.unit_share is None:
            self.unit_share = unit
        elif self.averaging == "log":
            self.unit_share = math.exp(math.log(self.unit_share) + self.smoothing * (math.log(unit) -
                                                                                     math.log(self.unit_share)))
        else:
            self.unit_share += self.smoothing * (unit - self.unit_share)
        step = self.rate * (math.log(self.target) - math.log(self.unit_share) - math.log(self.weight))
        limit = math.log(self.max_factor)
        self.weight = self._clip(math.exp(math.log(self.weight) + min(max(step, -limit), limit)))
        self.updates += 1
        return True

    def state_dict(self) -> dict:
        """Plain numbers and the averaging's name (checkpoint-safe: ``torch.load(weights_only=True)``)."""
        return {"target": float(self.target), "weight": float(self.weight), "averaging": self.averaging,
                "unit_share": self.unit_share, "updates": int(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s weight, average and count; the target and the averaging stay this controller's.

        A state written before 2026-12-07 holds ``log_unit_share`` (the average of ``log u``); it is read as
        ``ū = exp(log_unit_share)``.

        Raises:
            ValueError: when an entry is missing or not a number.
        """
        try:
            weight = float(state["weight"])
            if "unit_share" in state:
                unit = state["unit_share"]
                unit = None if unit is None else float(unit)
            else:
                unit = state["log_unit_share"]
                unit = None if unit is None else math.exp(float(unit))
            updates = int(state["updates"])
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"Share-controller state {state!r} is not one written by ShareController.state_dict "
                             f"({error!r}).") from None
        if not (math.isfinite(weight) and weight > 0) or (unit is not None and not (math.isfinite(unit) and unit > 0)):
            raise ValueError(f"Share-controller state {state!r} holds a weight or average <= 0 or a non-finite number.")
        self.weight, self.unit_share, self.updates = self._clip(weight), unit, updates


def _check(value, name: str, condition: str, ok, fix: str) -> None:
    try:
        valid = math.isfinite(float(value)) and ok(float(value))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"ShareController {name} {value!r}, must be {condition}. Use {fix}.")
