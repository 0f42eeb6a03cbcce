"""A 3D feature space that medgen trains itself, for the generative metrics.

Fréchet distance, MMD and the two-sample test compare *features* of volumes, and no pretrained
3D feature extractor can be downloaded here. So the feature space is a small 3D CNN,
:class:`FeatureEncoder`, trained self-supervised (SimCLR / NT-Xent, Chen et al. 2020) on the
real training volumes: two random views of one volume (crop-and-resize, left-right flip,
gamma, intensity scale and shift, blur, Gaussian noise) must map close together and away from
the views of the other volumes of the batch.

This is **not** an ImageNet (Inception) or Med3D feature space. Numbers computed in it are
named ``..._medgen3d`` (e.g. ``synthesis/fid_medgen3d``) and are comparable only between runs
that use *the same encoder file*: an encoder trained again (other data, other seed, other
steps) is another feature space. What the features are invariant to is what the augmentations
vary: a generator whose volumes differ from real ones only by such a change (a mild contrast
change, a left-right mirror) is invisible here. Up-down and front-back flips are *not*
augmentations, so an upside-down head is far from real heads in this space.

Pieces, all pure torch (this module does not import :mod:`medgen.training`, which sits above
``metrics``; the training loop itself is :func:`medgen.stages.evaluate_synthesis.train_feature_encoder`,
which drives the project's :class:`~medgen.training.trainer.Trainer` with them):

* :class:`AugmentConfig` / :func:`sample_view` / :func:`apply_view`: a random view is sampled
  as parameters (:class:`ViewParams`), then applied deterministically, so a view can be replayed.
* :class:`ContrastiveBatches`: ``batch(step)`` depends only on ``(seed, step)`` (resumable).
* :class:`ContrastiveObjective`: ``objective(model, batch) -> (loss, logs)``, the contract of
  :mod:`medgen.training.objectives` (a plain callable: it keeps no state of its own).
* :func:`nt_xent`: the loss.

Volumes are float arrays ``(N, D, H, W)`` normalised to about [0, 1] (the caller does it; the
``evaluate-synthesis`` stage maps each volume's 0.5-99.5 percentiles onto [0, 1]).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgen.validate import ParameterError, check_int, check_positive, check_range

__all__ = [
    "FEATURE_SPACE",
    "FEATURE_SPACE_DESCRIPTION",
    "AugmentConfig",
    "ContrastiveBatches",
    "ContrastiveObjective",
    "FeatureEncoder",
    "ViewParams",
    "apply_view",
    "check_volume_stack",
    "nt_xent",
    "sample_view",
]

#: Name of the feature space, used in metric names (``fid_medgen3d``) and MLflow params.
FEATURE_SPACE = "medgen3d"
FEATURE_SPACE_DESCRIPTION = (
    "medgen contrastive 3D encoder (SimCLR/NT-Xent) trained on the real training volumes; "
    "not an ImageNet/Inception or Med3D feature space; comparable only between runs that use "
    "the same encoder file"
)
MIN_SIDE_VOX = 8


def check_volume_stack(name: str, volumes: Any, *, min_count: int = 2, min_side: int = 1) -> np.ndarray:
    """``volumes`` as a finite float32 array ``(N, D, H, W)`` with ``N >= min_count``.

    Examples
    --------
    >>> check_volume_stack("real", np.zeros((3, 8, 8, 8))).shape
    (3, 8, 8, 8)
    >>> check_volume_stack("real", np.zeros((1, 8, 8, 8)))
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `real` must hold at least 2 volumes (N, D, H, W), got shape (1, 8, 8, 8)
    """
    try:
        out = np.asarray(volumes, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ParameterError(
            f"`{name}` must be a numeric array (N, D, H, W), got {type(volumes).__name__}"
        ) from exc
    if out.ndim != 4:
        raise ParameterError(f"`{name}` must be 4D (N, D, H, W), got shape {out.shape}")
    if out.shape[0] < min_count:
        raise ParameterError(
            f"`{name}` must hold at least {min_count} volumes (N, D, H, W), got shape {out.shape}"
        )
    if min(out.shape[1:]) < min_side:
        raise ParameterError(
            f"`{name}` volumes must be at least {min_side} voxels along every axis, got shape {out.shape}"
        )
    if not np.all(np.isfinite(out)):
        raise ParameterError(f"`{name}` must be finite, got NaN or infinite voxels")
    return out


# -- augmentation: sample parameters, then apply them deterministically --------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random views (values in the [0, 1] normalised intensity units).

    ``crop_scale``: side of the crop as a fraction of the volume's (one value for all axes, so
    shapes are not stretched), resized back to the full size. ``flip_axes``: axes that may be
    mirrored, each with probability 1/2; axis 0 is left-right on canonical (RAS) arrays.
    ``gamma``, ``intensity_scale``, ``intensity_shift``: ``(x.clip(0) ** gamma) * scale + shift``.
    ``blur_sigma_vox``: Gaussian blur in voxels (none below 0.3). ``noise_sigma``: Gaussian noise.
    """

    crop_scale: tuple[float, float] = (0.7, 1.0)
    flip_axes: tuple[int, ...] = (0,)
    gamma: tuple[float, float] = (0.7, 1.4)
    intensity_scale: tuple[float, float] = (0.85, 1.15)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    blur_sigma_vox: tuple[float, float] = (0.0, 1.0)
    noise_sigma: tuple[float, float] = (0.0, 0.05)

    def __post_init__(self) -> None:
        check_range("crop_scale", self.crop_scale, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_range("gamma", self.gamma, minimum=0.0, min_inclusive=False)
        check_range("intensity_scale", self.intensity_scale, minimum=0.0, min_inclusive=False)
        check_range("intensity_shift", self.intensity_shift)
        check_range("blur_sigma_vox", self.blur_sigma_vox, minimum=0.0)
        check_range("noise_sigma", self.noise_sigma, minimum=0.0)
        for axis in self.flip_axes:
            if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < 3:
                raise ParameterError(f"`flip_axes` must hold axes in 0..2, got {self.flip_axes!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ViewParams:
    """One sampled view: crop (start as a fraction of the free room per axis, side fraction),
    mirrored axes, gamma, scale, shift, blur sigma (voxels), noise sigma and noise seed."""

    crop_start: tuple[float, float, float]
    crop_scale: float
    flip: tuple[int, ...]
    gamma: float
    scale: float
    shift: float
    blur_sigma_vox: float
    noise_sigma: float
    noise_seed: int


def sample_view(rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> ViewParams:
    """Draw the parameters of one random view from ``rng``."""

    def uniform(r: tuple[float, float]) -> float:
        return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])

    start = tuple(float(v) for v in rng.uniform(0.0, 1.0, size=3))
    flips = tuple(int(a) for a in config.flip_axes if rng.random() < 0.5)
    return ViewParams(
        crop_start=start,  # type: ignore[arg-type]
        crop_scale=uniform(config.crop_scale),
        flip=flips,
        gamma=float(np.exp(uniform((np.log(config.gamma[0]), np.log(config.gamma[1]))))),
        scale=uniform(config.intensity_scale),
        shift=uniform(config.intensity_shift),
        blur_sigma_vox=uniform(config.blur_sigma_vox),
        noise_sigma=uniform(config.noise_sigma),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` (D, H, W), window +-3 sigma, edges replicated."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = x[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def apply_view(volume: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The view ``params`` of ``volume`` (D, H, W), same shape; deterministic.

    Examples
    --------
    >>> v = torch.rand(8, 8, 8)
    >>> same = ViewParams((0.0, 0.0, 0.0), 1.0, (), 1.0, 1.0, 0.0, 0.0, 0.0, 0)
    >>> bool(torch.allclose(apply_view(v, same), v))
    True
    """
    shape = tuple(volume.shape)
    size = [max(2, min(s, int(round(params.crop_scale * s)))) for s in shape]
    start = [int(round(f * (s - z))) for f, s, z in zip(params.crop_start, shape, size)]
    x = volume[tuple(slice(b, b + z) for b, z in zip(start, size))]
    if tuple(size) != shape:
        x = F.interpolate(x[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    if params.flip:
        x = torch.flip(x, dims=list(params.flip))
    x = x.clamp(min=0.0) ** params.gamma * params.scale + params.shift
    if params.blur_sigma_vox >= 0.3:
        x = _gaussian_blur(x, params.blur_sigma_vox)
    if params.noise_sigma > 0:
        g = torch.Generator().manual_seed(params.noise_seed)
        x = x + params.noise_sigma * torch.randn(shape, generator=g, dtype=x.dtype).to(x.device)
    return x.contiguous()


class ContrastiveBatches:
    """Pairs of random views of real volumes; ``batch(step)`` depends only on ``(seed, step)``.

    Parameters
    ----------
    volumes : array_like, shape (N, D, H, W)
        Normalised real volumes, N >= 2.
    batch_size : int >= 2
        Volumes per batch (at most N; drawn without replacement, so no volume is its own
        negative).
    seed : int
    augment : AugmentConfig

    Returns (from ``batch``) ``{"view_a", "view_b"}``, each ``(B, 1, D, H, W)`` float32.
    """

    def __init__(
        self, volumes: Any, batch_size: int = 8, seed: int = 0, augment: AugmentConfig = AugmentConfig()
    ) -> None:
        self.volumes = torch.from_numpy(np.ascontiguousarray(check_volume_stack("volumes", volumes)))
        self.batch_size = min(check_int("batch_size", batch_size, minimum=2), self.volumes.shape[0])
        self.seed = check_int("seed", seed, minimum=0)
        self.augment = augment

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(step)])
        index = rng.choice(self.volumes.shape[0], size=self.batch_size, replace=False)
        views_a, views_b = [], []
        for i in index:
            views_a.append(apply_view(self.volumes[int(i)], sample_view(rng, self.augment)))
            views_b.append(apply_view(self.volumes[int(i)], sample_view(rng, self.augment)))
        return {"view_a": torch.stack(views_a)[:, None], "view_b": torch.stack(views_b)[:, None]}


# -- the loss and the objective ------------------------------------------------------------


def nt_xent(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-temperature cross entropy (SimCLR) of paired embeddings.

    Parameters
    ----------
    z_a, z_b : torch.Tensor, shape (B, P)
        Row ``i`` of both is a positive pair; every other row of the batch is a negative.
    temperature : float > 0

    Returns
    -------
    loss : scalar tensor
        Mean over the ``2B`` anchors of ``-log softmax`` of the positive's cosine similarity.
    accuracy : scalar tensor
        Fraction of anchors whose most similar other embedding is their positive.

    Examples
    --------
    >>> z = torch.eye(4)
    >>> loss, acc = nt_xent(z, z, temperature=0.1)  # positives identical, negatives orthogonal
    >>> round(float(loss), 5), float(acc)  # log(1 + 6 exp(-10))
    (0.00027, 1.0)
    """
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return loss, accuracy


class ContrastiveObjective(nn.Module):
    """NT-Xent on the projections of two views: ``objective(model, batch) -> (loss, logs)``.

    Follows the objective contract of :mod:`medgen.training.objectives`; it keeps no state
    (the projection head belongs to the :class:`FeatureEncoder`, so the trainer's optimiser
    trains it), hence a plain callable rather than an ``Objective`` subclass.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)

    def forward(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        n = batch["view_a"].shape[0]
        # One forward pass over both views: GroupNorm has no batch statistics, and DDP wants
        # one forward per backward.
        z = model(torch.cat([batch["view_a"], batch["view_b"]]), project=True)
        loss, accuracy = nt_xent(z[:n], z[n:], self.temperature)
        return loss, {"loss": float(loss.detach()), "contrastive_accuracy": float(accuracy)}


# -- the network ---------------------------------------------------------------------------


class FeatureEncoder(nn.Module):
    """A small 3D CNN: volume ``(B, 1, D, H, W)`` -> feature vector ``(B, feature_dim)``.

    A stride-1 convolution and ``len(channels) - 1`` stride-2 convolutions (MONAI
    ``Convolution`` blocks: 3x3x3 conv, GroupNorm, ReLU), global average pooling and a linear
    layer. Any side of at least 8 voxels is accepted (padded strided convolutions and global
    pooling need no multiple of 8). A projection head (linear, ReLU, linear) is used only in
    training (``project=True``): as in SimCLR the features are taken before it.

    Parameters
    ----------
    feature_dim : int
        Length of the feature vector.
    channels : sequence of int
        Channels of each convolution block.
    projection_dim : int
        Length of the projection used by the contrastive loss.
    norm_groups : int
        GroupNorm groups (at most the block's channels).

    Examples
    --------
    >>> enc = FeatureEncoder(feature_dim=16, channels=(4, 8))
    >>> enc.features(np.zeros((3, 8, 8, 8), np.float32)).shape
    (3, 16)
    """

    def __init__(
        self,
        feature_dim: int = 64,
        channels: tuple[int, ...] | list[int] = (8, 16, 32, 64),
        projection_dim: int = 32,
        norm_groups: int = 4,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution  # lazy: MONAI is heavy to import

        feature_dim = check_int("feature_dim", feature_dim, minimum=2)
        projection_dim = check_int("projection_dim", projection_dim, minimum=2)
        norm_groups = check_int("norm_groups", norm_groups, minimum=1)
        channels = [check_int("channels", c, minimum=1) for c in channels]
        if not channels:
            raise ParameterError("`channels` must hold at least one channel count, got []")
        self.config = {
            "feature_dim": feature_dim,
            "channels": channels,
            "projection_dim": projection_dim,
            "norm_groups": norm_groups,
        }
        blocks = []
        previous = 1
        for i, c in enumerate(channels):
            groups = max(g for g in range(1, min(norm_groups, c) + 1) if c % g == 0)
            blocks.append(
                Convolution(
                    3, previous, c, strides=1 if i == 0 else 2, kernel_size=3,
                    act="relu", norm=("group", {"num_groups": groups}),
                )
            )
            previous = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, feature_dim)
        self.projection = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, projection_dim)
        )
        #: How the weights were obtained (data, seed, steps, augmentations); JSON-ready, saved
        #: with them by ``save_feature_encoder``.
        self.provenance: dict[str, Any] = {}

    def fingerprint(self) -> str:
        """SHA-256 of the configuration and weights: equal fingerprints, same feature space.

        Metrics from runs whose encoders have different fingerprints are not comparable.
        """
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        h = self.blocks(x).mean(dim=(2, 3, 4))
        features = self.head(h)
        return self.projection(features) if project else features

    @torch.no_grad()
    def features(self, volumes: Any, batch_size: int = 8) -> np.ndarray:
        """Feature vectors of normalised volumes.

        Parameters
        ----------
        volumes : array_like, shape (N, D, H, W)
            Normalised like the training volumes (about [0, 1]); each side >= 8 voxels.
        batch_size : int

        Returns
        -------
        np.ndarray, shape (N, feature_dim), float64
        """
        volumes = check_volume_stack("volumes", volumes, min_count=1, min_side=MIN_SIDE_VOX)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            out = []
            for i in range(0, volumes.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(volumes[i : i + batch_size]))[:, None].to(device)
                out.append(self(x).double().cpu().numpy())
        finally:
            self.train(was_training)
        return np.concatenate(out, axis=0)

