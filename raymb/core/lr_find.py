"""The learning-rate range test (Smith 2015/2017) as numbers: the schedule, the smoothed loss,
when to stop, and which rate to suggest. No torch: the workers' loop (raymb.worker.lr_find)
and the driver (raymb.driver.lr_find) share it.

- Schedule: `steps` rates growing exponentially from `low` to `high`.
- Smoothed loss: a debiased exponential moving average (decay SMOOTHING) of the step losses,
  every worker's all-reduced into one, so every rank holds the same curve.
- Stop: when the smoothed loss passes DIVERGED x its lowest so far, or a loss is not finite.
- Suggestion: the rate where the smoothed loss falls fastest against log10(rate), the first
  SKIP of the points left out (their moving average rests on a few losses and wanders).
  fastai's "valley" (the middle of the longest run of falling loss) is another defensible
  rule; steepest descent needs no run-length threshold and, on a quadratic, lands just below
  the rate that would diverge (docs/advice.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SMOOTHING = 0.98
"""The moving average's decay per step (fastai's and Lightning's)."""
DIVERGED = 4.0
"""Stop once the smoothed loss exceeds this multiple of its lowest."""
SKIP = 0.1
"""The share of the first points the suggestion ignores."""
MIN_STEPS = 10
MAX_STEPS = 100_000
"""The most steps a range test takes: its rates are a list held on every worker, and a test of
a few hundred steps is the usual; a hundred thousand is more than any curve needs."""
CSV_FILE = "lr_find.csv"
"""The curve, in the test's own directory: step, lr, loss, smoothed_loss (rank 0 writes it)."""
CSV_COLUMNS = ("step", "lr", "loss", "smoothed_loss")


def schedule(low: float, high: float, steps: int) -> list[float]:
    """`steps` rates from `low` to `high`, each the last times the same factor."""
    ratio = high / low
    return [low * ratio ** (i / (steps - 1)) for i in range(steps)]


@dataclass
class Curve:
    """The points of a range test so far: rates, losses, smoothed losses; and the stop rule."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    _average: float = 0.0

    def add(self, lr: float, loss: float) -> bool:
        """Record one step; True when the test should stop (the same verdict on every rank,
        given the same all-reduced loss)."""
        self.lrs.append(lr)
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            self.stop_reason = f"the loss is not finite at lr={lr:.3g}"
            return True
        self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
        smooth = self._average / (1 - SMOOTHING ** len(self.losses))
        self.smoothed.append(smooth)
        best = min(self.smoothed)
        if smooth > DIVERGED * best:
            self.stop_reason = f"the smoothed loss passed {DIVERGED:g}x its lowest at lr={lr:.3g}"
            return True
        return False


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The rate of steepest descent of `smoothed` against log10(rate), past the first SKIP
    of the points; None when fewer than MIN_STEPS finite points, or nothing falls."""
    points = [(math.log10(lr), s) for lr, s in zip(lrs, smoothed) if math.isfinite(s)]
    if len(points) < MIN_STEPS:
        return None
    slopes = _gradient(points)
    first = max(1, int(SKIP * len(points)))
    best = min(range(first, len(points)), key=lambda i: slopes[i])
    if not slopes[best] < 0:
        return None
    return 10 ** points[best][0]


def _gradient(points: list[tuple[float, float]]) -> list[float]:
    """d smoothed / d log10(lr): central differences inside, one-sided at the ends."""
    n = len(points)
    out = []
    for i in range(n):
        lo, hi = max(0, i - 1), min(n - 1, i + 1)
        (x0, y0), (x1, y1) = points[lo], points[hi]
        out.append((y1 - y0) / (x1 - x0))
    return out


LOW, HIGH, STEPS = 1e-7, 10.0, 100
"""The range test's defaults: --min, --max and --steps."""


def check_range(low: float, high: float, steps: int) -> str | None:
    """Why --min, --max and --steps do not make a range test, in one line, or None. Checked
    before anything is built (the schedule is a list of `steps` rates)."""
    if not (low > 0 and math.isfinite(low) and high > 0 and math.isfinite(high)):
        return f"--min {low:g} --max {high:g}: expected positive, finite rates"
    if low >= high:
        return f"--min {low:g} must be below --max {high:g}"
    if not math.isfinite(high / low):
        return f"--min {low:g} --max {high:g}: the range is too wide (its ratio overflows)"
    if steps < MIN_STEPS:
        return f"--steps {steps}: at least {MIN_STEPS} (the suggestion needs a curve)"
    if steps > MAX_STEPS:
        return f"--steps {steps}: at most {MAX_STEPS:,} (a few hundred is the usual)"
    return None
