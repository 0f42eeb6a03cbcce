"""The trainer: any model, any objective, any batch source; exact resume; DDP.

One step is: batch -> objective (under bf16 autocast on CUDA) -> backward -> gradient clipping
-> AdamW step -> LR schedule step -> EMA update -> objective's ``after_step``. Checkpoints
every N steps hold the model, optimiser, LR schedule, EMA, objective state, the RNG states of
every rank and the step, so training ``a + b`` steps equals training ``a``, stopping, resuming
and training ``b`` more, bit for bit.

Batches come from a :class:`StepBatches` (``batch(step)`` -> dict of tensors; resumable for
free since the batch depends only on the step) or from any iterator.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from medgen.training.checkpoint import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from medgen.training.distributed import DistInfo, all_gather_objects, mean_across_ranks
from medgen.training.objectives import Batch, Objective

LAST_CHECKPOINT = "last.pt"


@runtime_checkable
class StepBatches(Protocol):
    """A batch source indexed by step (and usually by rank): deterministic, resumable."""

    def batch(self, step: int) -> Batch: ...


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did."""

    steps_done: int
    final_step: int
    seconds: float
    last_logs: dict[str, float] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)


def lr_factor(step: int, total_steps: int, schedule: str = "cosine", warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps.

    Linear warm-up over ``warmup_steps``, then constant or a cosine decay to 0 at
    ``total_steps``.

    Examples
    --------
    >>> lr_factor(0, 100, "cosine", 10), lr_factor(10, 100, "cosine", 10), lr_factor(100, 100)
    (0.1, 1.0, 0.0)
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_with_warmup(decay: float) -> Callable[..., None]:
    """EMA update whose decay ramps up: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.

    With a fixed decay of 0.999 a 300-step run would keep ~74 % of its first weights; the
    ramp lets short runs (CPU, demos) average recent weights while long runs reach ``decay``.

    Examples
    --------
    >>> a, b = [torch.zeros(1)], [torch.ones(1)]
    >>> ema_with_warmup(0.999)(a, b, torch.tensor(1))  # decay 2/11 at the second update
    >>> round(float(a[0]), 4)
    0.8182
    """
    decay = float(decay)

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        pairs = [(e, p) for e, p in zip(ema_params, params) if e.dtype.is_floating_point]
        for e, p in zip(ema_params, params):
            if not e.dtype.is_floating_point:  # integer/bool buffers (masks, counters) are copied
                e.copy_(p)
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class Trainer:
    """Optimise ``model`` with ``objective`` on batches from ``batches``.

    Parameters
    ----------
    model : nn.Module
        The network; moved to the device (and wrapped in DDP when ``dist`` is distributed).
    objective : callable
        ``objective(model, batch) -> (loss, logs)``; an :class:`Objective` may keep state.
    batches : StepBatches or iterator of dict
        Batches of tensors; moved to the device by the trainer.
    total_steps : int
        Length of the LR schedule, and where :meth:`fit` stops by default.
    lr, weight_decay, lr_schedule, warmup_steps
        AdamW and its LambdaLR schedule (see :func:`lr_factor`).
    grad_clip_norm : float or None
        Clip the global gradient norm to this value.
    ema_decay : float or None
        Keep an exponential moving average of the weights (``torch.optim.swa_utils``), its
        decay ramped up over the first updates (:func:`ema_with_warmup`).
    amp : bool
        bf16 autocast on CUDA (ignored on the CPU, where it is off).
    checkpoint_dir : path or None
        Where ``step-<n>.pt`` and ``last.pt`` go every ``checkpoint_every`` steps.
    metadata : dict
        JSON-serialisable facts stored in every checkpoint (config, normalisation, ...).
    dist : DistInfo
        Rank, world size and device (:func:`medgen.training.distributed.init_distributed`).
    on_log : callable, optional
        ``on_log(step, logs)`` every ``log_every`` steps on rank 0 (losses averaged over ranks).
    on_validate : callable, optional
        ``on_validate(model, step)`` every ``val_every`` steps on rank 0 with the EMA (or raw)
        model in eval mode; returns metrics which are passed to ``on_log``.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
        batches: StepBatches | Iterator[Batch],
        *,
        total_steps: int,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        warmup_steps: int = 0,
        grad_clip_norm: float | None = 1.0,
        ema_decay: float | None = None,
        amp: bool = True,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100,
        log_every: int = 10,
        val_every: int = 0,
        metadata: dict[str, Any] | None = None,
        dist: DistInfo | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_validate: Callable[[nn.Module, int], dict[str, float]] | None = None,
        on_checkpoint: Callable[[int, Path], None] | None = None,
        progress: bool = False,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"`total_steps` must be >= 1, got {total_steps}")
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.total_steps = int(total_steps)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.grad_clip_norm = grad_clip_norm
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.log_every = int(log_every)
        self.val_every = int(val_every)
        self.metadata = dict(metadata or {})
        self.on_log = on_log
        self.on_validate = on_validate
        self.on_checkpoint = on_checkpoint
        self.progress = progress
        self.step = 0

        self.model = model.to(self.device)
        self.train_model = self._wrap(self.model)
        self.objective = objective
        if isinstance(objective, Objective):
            objective.setup(self.device, self.autocast, self._wrap)
        self.batches = batches

        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = lr_schedule
        total, warmup = self.total_steps, int(warmup_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, schedule, warmup)
        )
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(self.model, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)

    # -- helpers -------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast on CUDA when AMP is on; a no-op otherwise."""
        from medgen.inference.sliding import autocast_context

        return autocast_context(self.device, self.amp)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.is_distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def _next_batch(self) -> Batch:
        if isinstance(self.batches, StepBatches):
            batch = self.batches.batch(self.step)
        else:
            batch = next(self.batches)
        return {
            k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
        }

    @property
    def inference_model(self) -> nn.Module:
        """The weights to evaluate or export: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # -- one step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Run one optimisation step and advance :attr:`step`; returns the step's logs."""
        self.train_model.train()
        batch = self._next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, logs = self.objective(self.train_model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss.detach())} at step {self.step}")
        loss.backward()
        logs = dict(logs)
        if self.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            logs["grad_norm"] = float(norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if isinstance(self.objective, Objective):
            logs.update(self.objective.after_step(self.train_model, batch, self.step))
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.step += 1
        return logs

    # -- the loop ------------------------------------------------------------------------
    def fit(self, until_step: int | None = None) -> TrainResult:
        """Train from the current step up to ``until_step`` (default ``total_steps``)."""
        end = self.total_steps if until_step is None else min(int(until_step), self.total_steps)
        start_step, started = self.step, time.perf_counter()
        written: list[Path] = []
        logs: dict[str, float] = {}
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="training", leave=False)
        while self.step < end:
            logs = self.train_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4g}")
            if self.step % self.log_every == 0 or self.step == end:
                averaged = {k: mean_across_ranks(v, self.device) for k, v in sorted(logs.items())}
                if self.on_log is not None and self.dist.is_main:
                    self.on_log(self.step, averaged)
            if (
                self.val_every
                and self.on_validate is not None
                and (self.step % self.val_every == 0 or self.step == end)
            ):
                if self.dist.is_main:
                    model = self.inference_model
                    model.eval()
                    with torch.inference_mode():
                        metrics = self.on_validate(model, self.step)
                    if metrics and self.on_log is not None:
                        self.on_log(self.step, metrics)
            if self.checkpoint_dir is not None and (
                self.step % self.checkpoint_every == 0 or self.step == end
            ):
                path = self.save(self.checkpoint_dir / f"step-{self.step:07d}.pt")
                if path is not None:
                    written.append(path)
        if bar is not None:
            bar.close()
        return TrainResult(
            steps_done=self.step - start_step,
            final_step=self.step,
            seconds=time.perf_counter() - started,
            last_logs=logs,
            checkpoints=written,
        )

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: a ``weights_only``-loadable dict."""
        objective_state = None
        if isinstance(self.objective, Objective):
            objective_state = {"module": self.objective.state_dict(), "extra": self.objective.extra_state()}
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "metadata_json": json.dumps(self.metadata, sort_keys=True),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "objective": objective_state,
            "rng": all_gather_objects(capture_rng_state()),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (same model, objective and world size)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("the checkpoint has no EMA weights but this trainer keeps EMA")
            self.ema.load_state_dict(state["ema"])
        if isinstance(self.objective, Objective) and state.get("objective") is not None:
            self.objective.load_state_dict(state["objective"]["module"])
            self.objective.load_extra_state(state["objective"]["extra"])
        rng_states = state.get("rng") or []
        if int(state.get("world_size", 1)) == self.dist.world_size and len(rng_states) > self.dist.rank:
            restore_rng_state(rng_states[self.dist.rank])
        self.step = int(state["step"])

    def save(self, path: str | Path) -> Path | None:
        """Write a checkpoint atomically (rank 0 only) and point ``last.pt`` at it.

        Every rank must call this (RNG states are gathered from all ranks); returns the path
        on rank 0 and None elsewhere.
        """
        state = self.state_dict()
        if not self.dist.is_main:
            return None
        path = save_checkpoint(state, path)
        save_checkpoint(state, path.parent / LAST_CHECKPOINT)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.step, path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default ``<checkpoint_dir>/last.pt``) if it exists; True if loaded."""
        if path is None:
            if self.checkpoint_dir is None:
                return False
            path = self.checkpoint_dir / LAST_CHECKPOINT
        path = Path(path)
        if not path.is_file():
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        return True

    def export_model(self, path: str | Path) -> Path | None:
        """Write the inference weights (EMA if kept) + metadata: what ``enhance`` loads."""
        if not self.dist.is_main:
            return None
        return save_model_file(path, self.inference_model, self.metadata, step=self.step)


def save_model_file(path: str | Path, model: nn.Module, metadata: dict[str, Any], step: int = 0) -> Path:
    """A model file: weights plus the JSON metadata needed to rebuild and apply the network."""
    payload = {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "step": int(step),
        "metadata_json": json.dumps(metadata, sort_keys=True),
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
    }
    return save_checkpoint(payload, path)
