"""Latent diffusion: a denoiser on the latents of a frozen KL autoencoder, in one module.

:class:`LatentDiffusionModel` holds the autoencoder (frozen), the latent denoiser and the
latent scale factor, so that one model file rebuilds everything needed to synthesise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LatentDenoiser(nn.Module):
    """MONAI ``DiffusionModelUNet`` on latents, conditioned on a class and on covariates.

    Parameters
    ----------
    latent_channels : int
    channels, attention_levels, num_res_blocks, norm_num_groups, num_head_channels
        ``DiffusionModelUNet`` architecture; latent sides must be multiples of
        ``2 ** (len(channels) - 1)``.
    num_classes : int
        Class labels ``0 .. num_classes - 1``; one more embedding (index ``num_classes``)
        stands for "no class" (classifier-free guidance). 0: no class conditioning.
    num_covariates : int
        Scalar covariates (scaled to [0, 1]) given to cross-attention as a ``(B, 1, n)``
        context, as MONAI's brain latent-diffusion bundle does. 0: none.

    Shapes
    ------
    ``forward(x_t, timesteps, class_labels, covariates)``: ``x_t`` is
    ``(B, latent_channels, d, h, w)``, ``timesteps`` ``(B,)``, ``class_labels`` ``(B,)`` long
    or None, ``covariates`` ``(B, num_covariates)`` or None; the output has ``x_t``'s shape.
    """

    def __init__(
        self,
        latent_channels: int = 3,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 16,
        num_classes: int = 0,
        num_covariates: int = 0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet  # lazy: MONAI is heavy to import

        self.num_classes = int(num_classes)
        self.num_covariates = int(num_covariates)
        self.net = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels,
            out_channels=latent_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=self.num_classes + 1 if self.num_classes else None,
            with_conditioning=self.num_covariates > 0,
            cross_attention_dim=self.num_covariates or None,
        )

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.num_classes and class_labels is None:
            class_labels = torch.full((x_t.shape[0],), self.num_classes, dtype=torch.long, device=x_t.device)
        if not self.num_classes:
            class_labels = None
        context = None
        if self.num_covariates:
            if covariates is None:
                raise ValueError(f"this model needs {self.num_covariates} covariate(s); none were given")
            context = covariates.to(x_t.dtype).reshape(x_t.shape[0], 1, self.num_covariates)
        return self.net(x_t, timesteps=timesteps, context=context, class_labels=class_labels)


class LatentDiffusionModel(nn.Module):
    """Frozen autoencoder + latent denoiser + latent scale factor (a persistent buffer).

    The denoiser is a :class:`LatentDenoiser` or anything called the same way (a bundle's).

    ``forward`` is the denoiser's (what training optimises); :meth:`encode` gives scaled
    latents (posterior mean and std times ``scale_factor``) and :meth:`decode` images.
    """

    def __init__(self, autoencoder: nn.Module, denoiser: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.register_buffer("scale_factor", torch.ones(()))
        self.freeze_autoencoder()

    def freeze_autoencoder(self) -> None:
        """No gradients for the autoencoder: only the denoiser trains."""
        self.autoencoder.eval()
        for p in self.autoencoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> LatentDiffusionModel:
        super().train(mode)
        self.autoencoder.eval()  # stays frozen (and deterministic) in training mode too
        return self

    def forward(self, x_t, timesteps, class_labels=None, covariates=None) -> torch.Tensor:
        return self.denoiser(x_t, timesteps, class_labels, covariates)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, D, H, W)`` images -> scaled posterior mean and std ``(B, C, d, h, w)``."""
        mean, std = self.autoencoder.encode(images)
        return mean * self.scale_factor, std * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, C, d, h, w)`` -> images ``(B, 1, D, H, W)``."""
        return self.autoencoder.decode(latents / self.scale_factor)
