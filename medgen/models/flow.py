"""A normalizing flow over a frozen autoencoder's latents: exact likelihood of a scan.

:class:`LatentFlow` holds the autoencoder (frozen), the map from a scan's latents (and its
intensity descriptors) to one feature vector, the per-feature standardisation learnt from
the training scans (buffers) and a ``zuko`` neural spline flow with coupling layers
(``passes=2``: one network pass each way, so sampling is as fast as scoring).

Why ``zuko``: maintained, pure PyTorch, small; its flows take a context vector (class
conditioning) and its spline coupling transforms invert exactly in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LatentFlow(nn.Module):
    """Frozen autoencoder + latent features + standardisation + spline coupling flow.

    Parameters
    ----------
    autoencoder : nn.Module
        MONAI ``AutoencoderKL`` (``encode`` -> mean, std; ``decode``).
    latent_channels : int
    latent_shape : 3 ints
        The latent grid of one scan on the model's common grid.
    regions : 3 ints or None
        Pool the latent grid into this many regions per axis; each region gives the mean and
        the standard deviation of every channel. None: the whole latent grid (decodable).
    num_descriptors : int
        Intensity descriptors appended to the features (0: none).
    transforms, hidden_features, bins
        The flow: coupling layers, their networks' hidden widths, spline bins.
    num_classes : int
        Class-conditional flow (one-hot context) when > 0.

    Shapes
    ------
    ``features(latents, descriptors)``: ``(B, C, d, h, w)`` and ``(B, K)`` -> standardised
    ``(B, dim)``; ``log_prob(features, class_labels)`` -> log-likelihood ``(B,)`` in nats of
    the standardised features; ``forward(latents, descriptors, class_labels)`` both at once.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        latent_channels: int,
        latent_shape: Sequence[int],
        regions: Sequence[int] | None = (2, 2, 2),
        num_descriptors: int = 0,
        transforms: int = 4,
        hidden_features: Sequence[int] = (128, 128),
        bins: int = 8,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        import zuko  # lazy: only flows need it

        self.autoencoder = autoencoder
        self.latent_channels = int(latent_channels)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.regions = None if regions is None else tuple(int(r) for r in regions)
        if self.regions is not None and any(r > s for r, s in zip(self.regions, self.latent_shape)):
            raise ValueError(f"`regions` {list(self.regions)} exceed the latent grid {list(self.latent_shape)}")
        self.num_descriptors = int(num_descriptors)
        self.num_classes = int(num_classes)
        self.dim = self.latent_dim + self.num_descriptors
        self.register_buffer("feature_mean", torch.zeros(self.dim))
        self.register_buffer("feature_std", torch.ones(self.dim))
        # Flow latents are unscaled: 1 keeps the latent diffusion decoding path (split decoding) usable.
        self.register_buffer("scale_factor", torch.ones(()))
        self.register_buffer("class_log_prior", torch.full((max(self.num_classes, 1),), -math.log(max(self.num_classes, 1))))
        self.flow = zuko.flows.NSF(
            features=self.dim, context=self.num_classes, transforms=int(transforms),
            hidden_features=tuple(int(h) for h in hidden_features), bins=int(bins), passes=2,
        )  # fmt: skip
        self.freeze_autoencoder()

    @property
    def latent_dim(self) -> int:
        """Features that come from the latents."""
        if self.regions is None:
            return self.latent_channels * math.prod(self.latent_shape)
        return 2 * self.latent_channels * math.prod(self.regions)

    @property
    def decodable(self) -> bool:
        """Whether samples are whole latent grids (only then can they become volumes)."""
        return self.regions is None

    def freeze_autoencoder(self) -> None:
        self.autoencoder.eval()
        for p in self.autoencoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> LatentFlow:
        super().train(mode)
        self.autoencoder.eval()  # frozen, also while the flow trains
        return self

    def raw_features(self, latents: torch.Tensor, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        """Unstandardised features ``(B, dim)`` of latents ``(B, C, d, h, w)``."""
        latents = latents.float()
        if self.regions is None:
            parts = [latents.flatten(1)]
        else:
            mean = F.adaptive_avg_pool3d(latents, self.regions)
            square = F.adaptive_avg_pool3d(latents.pow(2), self.regions)
            std = (square - mean.pow(2)).clamp_min(1e-8).sqrt()
            parts = [mean.flatten(1), std.flatten(1)]
        if self.num_descriptors:
            if descriptors is None:
                raise ValueError(f"this flow needs {self.num_descriptors} intensity descriptors; none were given")
            parts.append(descriptors.float().reshape(latents.shape[0], self.num_descriptors))
        return torch.cat(parts, dim=1)

    def features(self, latents: torch.Tensor, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised features ``(B, dim)`` (what the flow models)."""
        return (self.raw_features(latents, descriptors) - self.feature_mean) / self.feature_std

    def set_standardisation(self, raw: torch.Tensor, floor: torch.Tensor | float = 1e-6) -> None:
        """Per-feature mean and standard deviation of the training scans' raw features, the
        SDs no smaller than ``floor`` (per feature or one number): a feature that barely
        varies over a few training scans would otherwise make any held-back scan look
        impossibly far."""
        std = raw.std(dim=0)
        self.feature_mean.copy_(raw.mean(dim=0))
        self.feature_std.copy_(torch.maximum(std, torch.as_tensor(floor, dtype=std.dtype).expand_as(std)))

    def _context(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if class_labels is None:
            raise ValueError(f"this flow is conditioned on {self.num_classes} classes; give a class label")
        return F.one_hot(class_labels.long().to(device), self.num_classes).float().expand(batch, -1)

    def log_prob(self, features: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood ``(B,)`` of standardised features; with classes and no label, the
        mixture over classes with the training class frequencies."""
        features = features.float()
        if self.num_classes and class_labels is None:
            per_class = [
                self.flow(self._context(torch.tensor([c]), len(features), features.device)).log_prob(features)
                for c in range(self.num_classes)
            ]
            return torch.logsumexp(torch.stack(per_class, dim=1) + self.class_log_prior, dim=1)
        return self.flow(self._context(class_labels, len(features), features.device)).log_prob(features)

    def forward(
        self,
        latents: torch.Tensor,
        descriptors: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        feature_noise: float = 0.0,
    ) -> torch.Tensor:
        """Log-likelihood ``(B,)`` of the scans whose latents (and descriptors) are given;
        ``feature_noise`` adds Gaussian noise of that many training SDs (training only)."""
        features = self.features(latents, descriptors)
        if feature_noise:
            features = features + feature_noise * torch.randn_like(features)
        return self.log_prob(features, class_labels)

    @torch.no_grad()
    def nll_per_feature(self, latents: torch.Tensor, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        """The gate's score ``(B,)``: negative log-likelihood per feature of the scans (with
        classes, under the class mixture), comparable across flows of different sizes."""
        return -self(latents, descriptors) / self.dim

    @torch.no_grad()
    def sample_features(self, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised features ``(B, dim)`` from base-distribution noise ``(B, dim)``."""
        noise = noise.float()
        return self.flow(self._context(class_labels, len(noise), noise.device)).transform.inv(noise)

    @torch.no_grad()
    def latents_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(B, C, d, h, w)`` of standardised whole-grid features."""
        if not self.decodable:
            raise ValueError("a flow over pooled regions cannot be decoded; train one with `regions: null`")
        raw = features * self.feature_std + self.feature_mean
        return raw[:, : self.latent_dim].reshape(len(raw), self.latent_channels, *self.latent_shape)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, D, H, W)`` normalised images -> unscaled posterior mean and std."""
        return self.autoencoder.encode(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images ``(B, 1, D, H, W)``."""
        return self.autoencoder.decode(latents)
