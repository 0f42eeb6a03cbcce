"""A small 3D classifier for augmentation experiments, trained with medgen's Trainer.

* :func:`build_classifier` - MONAI ``ResNet`` (basic blocks, small widths) with one logit.
* :class:`ClassificationObjective` - binary cross-entropy on that logit (the
  :class:`~medgen.training.objectives.Objective` contract).
* :class:`TensorBatches` - a :class:`~medgen.training.trainer.StepBatches` over in-memory
  volumes: batch ``step`` depends only on ``(seed, step)``; light augmentation (mirroring,
  intensity scale and shift) whose parameters are drawn first and then applied by the
  deterministic :func:`augment_batch`, so any batch can be replayed.
* :func:`train_classifier` and :func:`evaluate` (ROC AUC by Mann-Whitney ranks, accuracy at
  logit 0).

Images are ``(N, 1, D, H, W)`` (or ``(N, D, H, W)``) float32, normalised (see
:func:`medgen.augment.dataset.normalise_values`); labels are 0/1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgen.training.objectives import Batch, Objective
from medgen.validate import ParameterError, check_int, check_positive, check_range

__all__ = ["Augmentation", "ClassificationObjective", "ClassifierSettings", "TensorBatches", "augment_batch",
           "build_classifier", "check_images", "check_labels", "evaluate", "predict_scores", "train_classifier"]  # fmt: skip


@dataclass(frozen=True)
class ClassifierSettings:
    """The network and its training (everything but the step count and the seed).

    ``block_inplanes``/``layers``: MONAI ``ResNet`` widths and basic blocks per stage.
    ``flip_axes``: spatial axes mirrored with probability 1/2 (0 = left-right in RAS: heads are
    near mirror-symmetric). ``intensity_scale``/``intensity_shift``: uniform ranges applied as
    ``x * scale + shift`` (normalised units). ``augment=False`` turns all of it off.
    """

    block_inplanes: tuple[int, ...] = (8, 16, 32, 64)
    layers: tuple[int, ...] = (1, 1, 1, 1)
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    flip_axes: tuple[int, ...] = (0,)
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self) -> None:
        if len(self.block_inplanes) != 4 or len(self.layers) != 4:
            raise ParameterError(f"`block_inplanes` and `layers` must have 4 values each, got "
                                 f"{list(self.block_inplanes)} and {list(self.layers)}")  # fmt: skip
        for name in ("block_inplanes", "layers"):
            object.__setattr__(self, name, tuple(check_int(name, v, minimum=1) for v in getattr(self, name)))
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive("lr", self.lr)
        if self.weight_decay < 0:
            raise ParameterError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ParameterError(f"`flip_axes` must be spatial axes 0, 1, 2, got {list(self.flip_axes)}")
        check_range("intensity_scale", self.intensity_scale, minimum=0, min_inclusive=False)
        check_range("intensity_shift", self.intensity_shift)


def build_classifier(settings: ClassifierSettings | None = None) -> nn.Module:
    """MONAI 3D ``ResNet`` (basic blocks, 1 input channel, 1 logit)."""
    from monai.networks.nets import ResNet  # lazy: MONAI is heavy to import

    s = settings or ClassifierSettings()
    return ResNet(block="basic", layers=list(s.layers), block_inplanes=list(s.block_inplanes), spatial_dims=3,
                  n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, num_classes=1)  # fmt: skip


class ClassificationObjective(Objective):
    """Binary cross-entropy of ``model(batch["image"])`` (one logit) against ``batch["label"]``."""

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"]).float().reshape(-1)
        target = batch["label"].float().reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        accuracy = ((logits > 0).float() == target).float().mean()
        return loss, {"loss": float(loss.detach()), "accuracy": float(accuracy)}


@dataclass(frozen=True)
class Augmentation:
    """Drawn parameters of one batch: ``flips`` (B, len(flip_axes)) bool, ``scale`` and
    ``shift`` (B,) float (see :func:`augment_batch`)."""

    flip_axes: tuple[int, ...]
    flips: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, settings: ClassifierSettings) -> Augmentation:
        return cls(
            settings.flip_axes,
            rng.random((n, len(settings.flip_axes))) < 0.5,
            rng.uniform(*settings.intensity_scale, size=n),
            rng.uniform(*settings.intensity_shift, size=n),
        )


def augment_batch(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """Apply drawn parameters: mirror sample ``b`` along ``flip_axes[k]`` where ``flips[b, k]``,
    then ``x * scale[b] + shift[b]``. ``images`` ``(B, C, D, H, W)``; returns a new tensor.

    Examples
    --------
    >>> x = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    >>> aug = Augmentation((0,), np.array([[True]]), np.array([2.0]), np.array([1.0]))
    >>> augment_batch(x, aug)[0, 0, :, 0, 0].tolist()  # axis 0 mirrored, then 2x + 1
    [9.0, 1.0]
    """
    out = []
    for b in range(images.shape[0]):
        x = images[b]
        dims = [axis + 1 for axis, flip in zip(augmentation.flip_axes, augmentation.flips[b]) if flip]
        if dims:
            x = torch.flip(x, dims)
        out.append(x * float(augmentation.scale[b]) + float(augmentation.shift[b]))
    return torch.stack(out)


def check_images(name: str, images: Any) -> torch.Tensor:
    """``images`` as a float32 tensor ``(N, 1, D, H, W)`` (``(N, D, H, W)`` gets the channel)."""
    x = torch.as_tensor(np.asarray(images, np.float32) if not isinstance(images, torch.Tensor) else images)
    x = x.float()
    if x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1 or x.shape[0] < 1:
        raise ParameterError(f"`{name}` must be (N, 1, D, H, W) or (N, D, H, W), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ParameterError(f"`{name}` must be finite, got NaN or infinite values")
    return x


def check_labels(name: str, labels: Any, n: int) -> np.ndarray:
    """0/1 labels ``(n,)`` holding both classes, as int64."""
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ParameterError(f"`{name}` must have one label per image ({n}), got {y.shape[0]}")
    if not np.all(np.isin(y, (0, 1))):
        raise ParameterError(f"`{name}` must be 0 or 1, got values {np.unique(y)[:5].tolist()}")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ParameterError(f"`{name}` must hold both classes, got only {int(y[0])}")
    return y


class TensorBatches:
    """Step-indexed batches of in-memory images (a :class:`~medgen.training.trainer.StepBatches`).

    ``batch(step)`` draws ``batch_size`` distinct images with ``default_rng([seed, step])``,
    then (when ``settings.augment``) their :class:`Augmentation`, and returns ``"image"``
    ``(B, 1, D, H, W)`` and ``"label"`` ``(B,)`` float.
    """

    def __init__(self, images: Any, labels: Any, settings: ClassifierSettings | None = None, seed: int = 0) -> None:
        self.images = check_images("images", images)
        self.labels = torch.from_numpy(check_labels("labels", labels, self.images.shape[0]))
        self.settings = settings or ClassifierSettings()
        self.seed = check_int("seed", seed, minimum=0)

    def draw(self, step: int) -> tuple[np.ndarray, Augmentation | None]:
        """Which images and which augmentation batch ``step`` uses."""
        rng = np.random.default_rng([self.seed, int(step)])
        n = min(self.settings.batch_size, self.images.shape[0])
        index = rng.choice(self.images.shape[0], size=n, replace=False)
        return index, Augmentation.draw(rng, n, self.settings) if self.settings.augment else None

    def batch(self, step: int) -> Batch:
        index, augmentation = self.draw(step)
        images = self.images[torch.from_numpy(index)]
        if augmentation is not None:
            images = augment_batch(images, augmentation)
        return {"image": images, "label": self.labels[torch.from_numpy(index)].float()}


def train_classifier(
    images: Any,
    labels: Any,
    *,
    steps: int = 200,
    seed: int = 0,
    settings: ClassifierSettings | None = None,
    device: str | torch.device = "cpu",
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> nn.Module:
    """Train :func:`build_classifier` on ``images``/``labels`` for ``steps`` steps.

    The initial weights come from ``seed`` (the global torch RNG is left as it was) and batch
    ``k`` from ``(seed, k)``, so a run is repeatable. AdamW, cosine schedule with a short
    warm-up, gradient clipping at 1, no EMA, no checkpoints.

    Returns
    -------
    nn.Module
        The trained network in eval mode, on ``device``.
    """
    from medgen.training.distributed import DistInfo
    from medgen.training.trainer import Trainer

    settings = settings or ClassifierSettings()
    steps = check_int("steps", steps, minimum=1)
    batches = TensorBatches(images, labels, settings, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(settings)
    trainer = Trainer(
        model, ClassificationObjective(), batches, total_steps=steps, lr=settings.lr,
        weight_decay=settings.weight_decay, lr_schedule="cosine", warmup_steps=min(10, steps // 10),
        grad_clip_norm=1.0, ema_decay=None, checkpoint_dir=None, log_every=max(1, steps // 10),
        dist=DistInfo(device=torch.device(device)), on_log=on_log,
    )  # fmt: skip
    trainer.fit()
    return trainer.model.eval()


@torch.no_grad()
def predict_scores(model: nn.Module, images: Any, batch_size: int = 16) -> np.ndarray:
    """The classifier's logits ``(N,)`` (higher: label 1) in eval mode."""
    x = check_images("images", images)
    device = next(model.parameters()).device
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).float().reshape(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


def evaluate(model: nn.Module, images: Any, labels: Any) -> dict[str, float]:
    """``{"auc": ROC AUC of the logits, "accuracy": fraction right at logit 0}``.

    The AUC is :func:`medgen.metrics.generative.roc_auc` (Mann-Whitney ranks, ties 1/2).
    """
    from medgen.metrics.generative import roc_auc

    scores = predict_scores(model, images)
    y = check_labels("labels", labels, len(scores))
    return {"auc": roc_auc(scores, y), "accuracy": float(np.mean((scores > 0) == (y == 1)))}
