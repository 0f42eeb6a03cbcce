"""Shared pieces of per-scan adaptation: intensity scaling, budgeted loops, records.

* :class:`IntensityScale` maps a scan to about ``[0, 1]`` and back, exactly.
* :func:`budgeted_loop` runs optimisation steps until a step budget is spent or the clock
  runs out, estimates the time up front, logs progress with an ETA and records what it did
  (:class:`AdaptRecord`), for logs, the sidecar and MLflow; :func:`warn_below_minimum`
  says so in one line when too few steps ran.
* :func:`basic_unet` builds the MONAI network the adapters use, starting as the identity.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from medgen.validate import ParameterError, check_int, check_non_negative

__all__ = [
    "AdaptRecord",
    "IntensityScale",
    "basic_unet",
    "budget_is_empty",
    "budgeted_loop",
    "check_budget",
    "cosine_lr",
    "format_seconds",
    "seeded",
    "warn_below_minimum",
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


def check_budget(seconds: Any, max_steps: Any) -> tuple[float | None, int | None]:
    """Validate a time budget (seconds >= 0, or None: no clock) and a step budget (int >= 0).

    At least one of them must be given: a loop needs something that ends it.
    """
    if seconds is None and max_steps is None:
        raise ParameterError("give a time budget `seconds` or a step budget `max_steps` (both are None)")
    if seconds is not None:
        seconds = check_non_negative("seconds", seconds)
    if max_steps is not None:
        max_steps = check_int("max_steps", max_steps, minimum=0)
    return seconds, max_steps


def budget_is_empty(seconds: float | None, max_steps: int | None) -> bool:
    """True when the budget allows no step at all (``seconds == 0`` or ``max_steps == 0``).

    Examples
    --------
    >>> budget_is_empty(0.0, None), budget_is_empty(None, 5), budget_is_empty(60.0, 0)
    (True, False, True)
    """
    return seconds == 0 or max_steps == 0


@contextmanager
def seeded(seed: int):
    """Seed torch's global generator inside the block and restore its state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def format_seconds(seconds: float) -> str:
    """``75.0`` -> ``"1 min 15 s"``, ``5.2`` -> ``"5 s"``, ``4020`` -> ``"1 h 07 min"``.

    Examples
    --------
    >>> format_seconds(5.2), format_seconds(75.0), format_seconds(4020.0)
    ('5 s', '1 min 15 s', '1 h 07 min')
    """
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def budgeted_loop(
    step: Callable[[int, float], float],
    seconds: float | None,
    max_steps: int | None,
    record: AdaptRecord,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
    *,
    min_steps: int = 0,
    estimate_after: int = 4,
) -> AdaptRecord:
    """Call ``step(i, progress)`` until the step budget is spent or the clock runs out.

    Two budgets, and which one rules:

    * **Step budget** (``max_steps``): the run does exactly ``max_steps`` steps and its
      learning-rate schedule follows the steps alone (``progress = i / max_steps``), so the
      result does not depend on the machine's speed or load. ``seconds`` is then only a
      safety cap: if the clock runs out first the run stops early (``stopped_by = "time"``).
    * **Time budget only** (``max_steps is None``): steps run until ``seconds`` pass and
      the schedule follows the clock; how many steps fit depends on the machine.

    After ``estimate_after`` steps the time per step (measured from the end of the first
    step, which pays one-off costs) is extrapolated to the whole budget and logged; then a
    progress line with an ETA every ``log_every`` steps. ``record`` receives the steps run,
    the losses and, in ``params``: ``steps_budget``, ``seconds_cap``, ``steps_minimum``,
    ``stopped_by`` (``"steps"`` or ``"time"``), ``below_minimum_steps`` (fewer than
    ``min_steps`` steps ran) and ``seconds_per_step`` / ``seconds_estimate``.

    Examples
    --------
    >>> rec = budgeted_loop(lambda i, p: 1.0 / (i + 1), None, 3, AdaptRecord("demo"))
    >>> rec.steps, rec.losses[-1], rec.params["stopped_by"]
    (3, 0.3333333333333333, 'steps')
    """
    started = time.perf_counter()
    record.params.update(
        steps_budget=max_steps, seconds_cap=seconds, steps_minimum=int(min_steps), stopped_by="steps"
    )
    after_first = None
    i = 0
    while True:
        elapsed = time.perf_counter() - started
        if max_steps is not None and i >= max_steps:
            break
        if seconds is not None and elapsed >= seconds:
            record.params["stopped_by"] = "time"
            break
        # With a step budget the schedule follows the steps alone, so that a run is
        # repeatable whatever the machine's speed; the clock then only stops it early.
        if max_steps:
            progress = i / max_steps
        else:
            progress = elapsed / seconds if seconds else 1.0
        loss = float(step(i, min(progress, 1.0)))
        if not math.isfinite(loss):
            raise FloatingPointError(f"{record.method}: the loss became {loss} at step {i}")
        record.losses.append(loss)
        i += 1
        now = time.perf_counter()
        if i == 1:
            after_first = now
        if i == estimate_after and after_first is not None:
            per_step = (now - after_first) / max(estimate_after - 1, 1)
            record.params["seconds_per_step"] = round(per_step, 4)
            _log_estimate(record, per_step, now - started, i, seconds, max_steps, log)
        if log is not None and i % log_every == 0:
            recent = record.losses[-log_every:]
            log(f"{record.method}: {_progress_text(i, now - started, seconds, max_steps)}, loss {np.mean(recent):.4g}")
    record.steps = i
    record.seconds_train = time.perf_counter() - started
    record.params["below_minimum_steps"] = bool(i < min_steps)
    if i > 1 and after_first is not None:
        record.params["seconds_per_step"] = round((time.perf_counter() - after_first) / (i - 1), 4)
    return record


def _log_estimate(
    record: AdaptRecord, per_step: float, elapsed: float, done: int, seconds: float | None,
    max_steps: int | None, log: Callable[[str], None] | None,
) -> None:
    """Extrapolate the first steps' time per step to the budget; log it once."""
    if max_steps is None:
        # Time budget: how many steps will fit is the question.
        fit = done + int(max((seconds or 0.0) - elapsed, 0.0) / max(per_step, 1e-9))
        record.params["steps_estimate"] = fit
        text = f"time budget {format_seconds(seconds or 0.0)}: about {fit} steps at {per_step:.3g} s/step"
    else:
        total = elapsed + per_step * (max_steps - done)
        record.params["seconds_estimate"] = round(total, 1)
        text = f"{max_steps} steps at {per_step:.3g} s/step: about {format_seconds(total)}"
        if seconds is not None and total > seconds:
            cut = done + int(max(seconds - elapsed, 0.0) / max(per_step, 1e-9))
            text += f"; the {format_seconds(seconds)} clock cap will stop it after about {cut} steps"
    if log is not None:
        log(f"{record.method}: {text} (measured on steps 2-{done})")


def _progress_text(done: int, elapsed: float, seconds: float | None, max_steps: int | None) -> str:
    """``step 100/500, 36 s, ETA 2 min 24 s`` (by steps, capped by the clock if it ends first)."""
    if max_steps is not None:
        eta = elapsed / done * (max_steps - done)
        if seconds is not None:
            eta = min(eta, max(seconds - elapsed, 0.0))
        return f"step {done}/{max_steps}, {format_seconds(elapsed)}, ETA {format_seconds(eta)}"
    return f"step {done}, {format_seconds(elapsed)}, ETA {format_seconds(max((seconds or 0.0) - elapsed, 0.0))}"


def warn_below_minimum(record: AdaptRecord, advice: str, stream: TextIO | None = None) -> bool:
    """Write one line to ``stream`` (stderr) when fewer than the minimum steps ran; return the flag.

    Examples
    --------
    >>> import io
    >>> rec = AdaptRecord("smore", steps=3, params={"steps_minimum": 200, "below_minimum_steps": True,
    ...                                             "stopped_by": "steps"})
    >>> out = io.StringIO()
    >>> warn_below_minimum(rec, "raise the step budget", out)
    True
    >>> print(out.getvalue().strip())
    WARNING: smore ran only 3 training steps, below the minimum of 200 for a reliable result (the step budget ended it); raise the step budget
    """
    if not record.params.get("below_minimum_steps"):
        return False
    why = "the clock cap ended it" if record.params.get("stopped_by") == "time" else "the step budget ended it"
    line = (
        f"WARNING: {record.method} ran only {record.steps} training steps, below the minimum of "
        f"{record.params.get('steps_minimum')} for a reliable result ({why}); {advice}"
    )
    print(line, file=stream if stream is not None else sys.stderr, flush=True)
    return True


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
