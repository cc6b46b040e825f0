"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), from the
squared norms of the gradient at two batch sizes that data-parallel training computes anyway.

With G the true gradient and Sigma the per-row covariance of the gradients, the mean gradient
over b rows drawn at random has E |G_b|^2 = |G|^2 + tr(Sigma) / b. Two batch sizes give two
equations, whose solution is the unbiased pair

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each step gives one noisy pair; both are kept as debiased exponential moving averages and the
estimate is the ratio of the averages (the average of the ratios is biased). raymb's B_small
is one worker's rows (on one worker, half the step's microbatches), B_big the step's; when
the workers' rows differ, 1 / B_small is the mean of their 1 / b_w, which keeps the first
equation exact for the workers' mean |G_w|^2.
"""

from __future__ import annotations

from dataclasses import dataclass

BETA = 0.99
"""The moving averages' decay per step: about the last hundred steps count."""


def unbiased_pair(
    small_sq: float, inv_small: float, big_sq: float, inv_big: float
) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from |G_small|^2 and |G_big|^2 at 1/B_small > 1/B_big."""
    spread = inv_small - inv_big
    trace = (small_sq - big_sq) / spread
    return big_sq - trace * inv_big, trace


@dataclass
class NoiseScale:
    """The moving averages of |G|^2 and tr(Sigma), one step at a time."""

    grad_sq: float = 0.0
    trace: float = 0.0
    steps: int = 0

    def add(self, small_sq: float, inv_small: float, big_sq: float, inv_big: float) -> None:
        """One step's norms; a step whose two batch sizes agree (one worker had every row)
        says nothing about the noise and is left out."""
        if not inv_small > inv_big:
            return
        grad_sq, trace = unbiased_pair(small_sq, inv_small, big_sq, inv_big)
        self.grad_sq = BETA * self.grad_sq + (1 - BETA) * grad_sq
        self.trace = BETA * self.trace + (1 - BETA) * trace
        self.steps += 1

    @property
    def value(self) -> float | None:
        """B_simple in rows, or None while the averaged |G|^2 is not yet positive (the debias
        factors of the two averages are equal and cancel in the ratio)."""
        if not self.steps or not self.grad_sq > 0:
            return None
        return max(self.trace, 0.0) / self.grad_sq

    def state(self) -> list[float]:
        return [self.grad_sq, self.trace, self.steps]

    @classmethod
    def from_state(cls, state: list[float] | None) -> NoiseScale:
        if not state:
            return cls()
        grad_sq, trace, steps = state
        return cls(float(grad_sq), float(trace), int(steps))


def batch_advice(estimate: float | None, global_batch: int | str) -> str | None:
    """The result table's line when G is far from the estimate (a tenth or ten times), else
    None. The estimate moves as training goes (Merrill et al. 2025): it is advice, not a law."""
    if estimate is None or not isinstance(global_batch, int) or estimate <= 0:
        return None
    if global_batch < estimate / 10:
        where = "far below it"
    elif global_batch > 10 * estimate:
        where = "far above it"
    else:
        return None
    return f"critical batch ≈ {estimate:,.0f} rows: the global batch G = {global_batch} is {where}"
