"""Shared pieces of per-scan adaptation: intensity scaling, budgeted loops, records.

* :class:`IntensityScale` maps a scan to about ``[0, 1]`` and back, exactly.
* :func:`budgeted_loop` runs optimisation steps until a time budget or a step cap runs out
  and records what it did (:class:`AdaptRecord`), for logs and MLflow.
* :func:`basic_unet` builds the MONAI network the adapters use, starting as the identity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medgen.validate import check_int, check_non_negative

__all__ = [
    "AdaptRecord",
    "IntensityScale",
    "basic_unet",
    "budgeted_loop",
    "check_budget",
    "cosine_lr",
    "seeded",
]


@dataclass(frozen=True)
class IntensityScale:
    """``normalised = (values - offset) / scale`` with a robust offset and span.

    ``offset`` is the 0.5th percentile and ``scale`` the 99.5th minus the 0.5th percentile of
    the volume, so an MR magnitude image maps its background to about 0 and bright tissue to
    about 1, and a CT in HU maps air to about 0 and bone to about 1.

    Examples
    --------
    >>> s = IntensityScale.fit(np.linspace(0.0, 200.0, 1001, dtype=np.float32))
    >>> round(s.offset, 1), round(s.scale, 1)
    (1.0, 198.0)
    >>> float(s.inverse(s.forward(np.float32(50.0))))
    50.0
    """

    offset: float
    scale: float

    @classmethod
    def fit(cls, values: np.ndarray) -> IntensityScale:
        low, high = np.percentile(np.asarray(values, dtype=np.float32), [0.5, 99.5])
        span = float(high - low)
        if not span > 0:
            span = float(np.max(values) - np.min(values)) or 1.0
        return cls(float(low), span)

    def forward(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)).astype(
            np.float32
        )

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        return (np.asarray(normalised, dtype=np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(
            np.float32
        )


@dataclass
class AdaptRecord:
    """What an adaptation did, for logs and MLflow (``to_dict`` gives params and a loss curve)."""

    method: str
    steps: int = 0
    seconds_train: float = 0.0
    seconds_total: float = 0.0
    losses: list[float] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_budget(seconds: Any, max_steps: Any) -> tuple[float, int | None]:
    """Validate a time budget (seconds >= 0) and an optional step cap (int >= 0)."""
    seconds = check_non_negative("seconds", seconds)
    if max_steps is not None:
        max_steps = check_int("max_steps", max_steps, minimum=0)
    return seconds, max_steps


@contextmanager
def seeded(seed: int):
    """Seed torch's global generator inside the block and restore its state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def budgeted_loop(
    step: Callable[[int, float], float],
    seconds: float,
    max_steps: int | None,
    record: AdaptRecord,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> AdaptRecord:
    """Call ``step(i, progress)`` until ``seconds`` pass or ``max_steps`` steps are done.

    ``progress`` is the fraction of the budget used so far, for learning-rate schedules: by
    steps when there is a step cap (repeatable runs), else by time. ``step`` returns the loss, which is
    recorded. A budget of 0 seconds runs no step.
    """
    started = time.perf_counter()
    i = 0
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= seconds or (max_steps is not None and i >= max_steps):
            break
        # With a step cap the schedule follows the steps alone, so that a run is repeatable
        # whatever the machine's speed; the time budget then only stops it early.
        progress = i / max_steps if max_steps else (elapsed / seconds if seconds > 0 else 1.0)
        loss = float(step(i, min(progress, 1.0)))
        if not math.isfinite(loss):
            raise FloatingPointError(f"{record.method}: the loss became {loss} at step {i}")
        record.losses.append(loss)
        i += 1
        if log is not None and i % log_every == 0:
            recent = record.losses[-log_every:]
            log(f"{record.method}: step {i}, loss {np.mean(recent):.4g}, {time.perf_counter() - started:.0f} s")
    record.steps = i
    record.seconds_train = time.perf_counter() - started
    return record


def cosine_lr(base: float, progress: float, warmup: float = 0.05) -> float:
    """Learning rate with a short linear warm-up, then a cosine decay to 5% of ``base``.

    Examples
    --------
    >>> cosine_lr(1.0, 0.0) < 0.1, cosine_lr(1.0, 0.05), round(cosine_lr(1.0, 1.0), 3)
    (True, 1.0, 0.05)
    """
    if progress < warmup:
        return base * (0.05 + 0.95 * progress / warmup)
    t = (progress - warmup) / (1.0 - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def basic_unet(dims: int, in_channels: int, out_channels: int, features: tuple[int, ...]):
    """MONAI ``BasicUNet`` without normalisation layers, its last convolution zeroed.

    Zeroing the last 1x1 convolution makes a residual network start as the identity.
    """
    from monai.networks.nets import BasicUNet  # lazy: MONAI is heavy to import
    from torch import nn

    # No normalisation layers: instance norm would discard the absolute intensity, which a
    # denoiser of signal-dependent (Rician) noise needs, and differ between patch sizes.
    net = BasicUNet(
        spatial_dims=dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm=None,
    )
    nn.init.zeros_(net.final_conv.weight)  # start as the identity (zero correction)
    nn.init.zeros_(net.final_conv.bias)
    return net
