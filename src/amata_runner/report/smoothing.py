"""TensorBoard's scalar smoothing, so our curves look like the paper's (Appendix A: weight 0.6 on
CIFAR10, 0.09 on MNIST, "the smoothing function used in Tensorboard").

This is TensorBoard's ``classicSmoothing`` (tensorboard/webapp/widgets/line_chart_v2/
data_transformer.ts): an exponential moving average started at 0 and debiased by ``1 - w^n``, where
``n`` counts the finite points seen so far; non-finite points pass through unchanged and are not
counted; a constant series is returned as it is. The debiasing makes the first smoothed point equal
the first raw point instead of ``(1 - w)`` times it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def tensorboard_smooth(values: Sequence[float], weight: float) -> list[float]:
    """Smoothed copy of ``values``: ``last = last * w + (1 - w) * x``; ``y = last / (1 - w^n)``."""
    points = [float(v) for v in values]
    if not points or all(v == points[0] for v in points):
        return points
    last = 0.0
    count = 0
    smoothed: list[float] = []
    for value in points:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1.0 - weight) * value
        count += 1
        debias = 1.0 - weight**count if weight != 1 else 1.0
        smoothed.append(last / debias)
    return smoothed
