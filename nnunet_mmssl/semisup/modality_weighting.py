"""Modality-adaptive weighting (MAW) of DBDC, eqs. (13)-(16) of Chen et al. (dbdc_chen2024.txt).

For modality k at epoch t, from its validation Dice ``lambda`` over the last ``tau`` epoch-to-epoch changes:

* ``r_t = ln(lambda_t / lambda_{t-1})`` with lambda clamped to at least ``dice_floor`` (a Dice of 0 would make the
  log infinite);
* ``d+ = sum of r_t where Delta = lambda_t - lambda_{t-1} > 0`` (eq. 15);
* ``d- = sum of |r_t| where Delta <= 0`` (eq. 16). The paper prints ``d-`` as the plain sum of these non-positive
  logs, which would make ``S`` negative (and ``S^beta`` undefined for non-integer beta); we use the magnitude;
* ``S = (d+ + eps) / (d- + eps)`` (eq. 14), the learning speed: improving faster than falling gives ``S > 1``;
* ``P = mean of lambda over the window`` (the paper's "accumulate lambda over tau epochs", read as the mean, so that
  ``P`` lies in [0, 1] and ``1 - P`` is an error rate);
* ``omega_k = S^(-beta) * (1 - P)`` (eq. 13), then normalised so that the K weights sum to K.

With ``eps = 1e-8`` as printed, a modality whose Dice only rose in the window has ``S = d+ / 1e-8`` (huge), hence a
small weight (``d+ = 0.5``: ``S^-0.2 ~ 0.03``); that is the paper's formula, kept as is.
"""

from collections.abc import Sequence

import numpy as np


def _modality_raw_weight(column: np.ndarray, beta: float, eps: float, dice_floor: float) -> float:
    """Unnormalised ``omega`` of one modality from its (finite) Dice values in the window; NaN if none."""
    if column.size == 0:
        return float("nan")
    clamped = np.maximum(column, dice_floor)
    log_ratio = np.log(clamped[1:] / clamped[:-1])
    delta = np.diff(column)
    d_plus = float(np.sum(log_ratio[delta > 0]))
    d_minus = float(np.sum(np.abs(log_ratio[delta <= 0])))
    speed = (d_plus + eps) / (d_minus + eps)
    performance = float(np.mean(column))
    return speed ** (-beta) * (1.0 - performance)


def modality_adaptive_weights(dice_history: Sequence[Sequence[float]] | np.ndarray, tau: int = 20,
                              beta: float = 0.2, eps: float = 1e-8, dice_floor: float = 1e-3) -> np.ndarray:
    """MAW weights of eqs. (13)-(16) from the per-epoch validation Dice of each modality.

    The window is the last ``tau + 1`` rows (``tau`` changes). NaN entries (a modality without validation cases that
    epoch) are dropped from that modality's window, and its changes are taken between its consecutive finite
    values. A modality with one finite value has ``S = 1`` (no change seen); one with none gets the mean raw weight
    of the others (a neutral weight). Fewer than 2 epochs, no finite value at all, or all weights 0 (every modality
    at Dice 1) give all ones.

    Args:
        dice_history: (T, K) Dice in [0, 1] (or NaN), one row per epoch, oldest first.
        tau: number of epoch-to-epoch changes in the window (20 in the paper).
        beta: exponent of the speed term (0.2 in the paper).
        eps: smoothing of eq. (14) (1e-8 in the paper).
        dice_floor: lower clamp of the Dice inside the logarithm.

    Returns:
        (K,) float64 weights, non-negative, summing to K.
    """
    history = np.asarray(dice_history, dtype=np.float64)
    if history.ndim != 2:
        raise ValueError(f"dice_history must be (epochs, modalities), got shape {history.shape}.")
    if tau < 1:
        raise ValueError(f"MAW needs tau >= 1, got {tau}.")
    if not 0.0 < dice_floor <= 1.0:
        raise ValueError(f"MAW needs dice_floor in (0, 1], got {dice_floor}.")
    finite = history[np.isfinite(history)]
    if np.isinf(history).any() or (finite.size and (finite.min() < 0.0 or finite.max() > 1.0)):
        raise ValueError("MAW Dice values must lie in [0, 1] (or be NaN for a modality without validation cases), "
                         f"got range [{np.nanmin(history)}, {np.nanmax(history)}].")
    num_epochs, num_modalities = history.shape
    ones = np.ones(num_modalities, dtype=np.float64)
    if num_epochs < 2:
        return ones
    window = history[-(tau + 1):]
    raw = np.array([_modality_raw_weight(window[np.isfinite(window[:, k]), k], beta, eps, dice_floor)
                    for k in range(num_modalities)])
    known = np.isfinite(raw)
    if not known.any():
        return ones
    raw[~known] = raw[known].mean()
    total = raw.sum()
    if total <= 0:
        return ones
    return raw * num_modalities / total


class ModalityWeighting:
    """Per-epoch Dice history of K modalities and their MAW weights (:func:`modality_adaptive_weights`).

    The state holds plain Python containers only (a list of names, a list of per-epoch lists of floats, numbers), so a
    checkpoint holding it loads with ``torch.load(weights_only=True)``; loading it back gives identical weights.

    Args:
        names: the K modality names (in the order of the Dice values passed to :meth:`record`).
        tau: window of eqs. (15)-(16).
        beta: exponent of eq. (13).
        eps: smoothing of eq. (14).
        dice_floor: lower clamp of the Dice inside the logarithm.
    """

    def __init__(self, names: Sequence[str], tau: int = 20, beta: float = 0.2, eps: float = 1e-8,
                 dice_floor: float = 1e-3):
        if len(names) < 1:
            raise ValueError("ModalityWeighting needs at least one modality name.")
        self.names = [str(n) for n in names]
        self.tau = int(tau)
        self.beta = float(beta)
        self.eps = float(eps)
        self.dice_floor = float(dice_floor)
        self.history: list[list[float]] = []

    def record(self, epoch_dice: Sequence[float]) -> None:
        """Append one epoch's validation Dice per modality (NaN where a modality had no validation case)."""
        values = [float(v) for v in epoch_dice]
        if len(values) != len(self.names):
            raise ValueError(f"ModalityWeighting.record needs {len(self.names)} Dice values ({self.names}), "
                             f"got {len(values)}.")
        self.history.append(values)

    def weights(self) -> np.ndarray:
        """(K,) MAW weights summing to K (all ones before two epochs are recorded)."""
        if not self.history:
            return np.ones(len(self.names), dtype=np.float64)
        return modality_adaptive_weights(self.history, self.tau, self.beta, self.eps, self.dice_floor)

    def state_dict(self) -> dict:
        """Plain-container state: names, history (list of lists of floats) and the settings."""
        return {"names": list(self.names), "history": [list(row) for row in self.history], "tau": self.tau,
                "beta": self.beta, "eps": self.eps, "dice_floor": self.dice_floor}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the modality names must match."""
        if list(state["names"]) != self.names:
            raise ValueError(f"ModalityWeighting state is for modalities {list(state['names'])}, this run has "
                             f"{self.names}; resume with the same dataset.")
        self.history = [[float(v) for v in row] for row in state["history"]]
        self.tau = int(state["tau"])
        self.beta = float(state["beta"])
        self.eps = float(state["eps"])
        self.dice_floor = float(state["dice_floor"])
