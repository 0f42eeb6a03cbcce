"""Conditional diffusion denoiser: MONAI ``DiffusionModelUNet`` seeing the degraded image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medgen.models.unet import noise_channel


class ConditionalDiffusionUNet(nn.Module):
    """Predicts noise (or ``v``, or the sample) of a diffusion state given the degraded image.

    The degraded image (and optionally a noise-level channel) is concatenated to the noisy
    state as extra input channels; no cross-attention is needed.

    Parameters
    ----------
    channels, attention_levels, num_res_blocks, norm_num_groups
        ``DiffusionModelUNet`` architecture; spatial sizes must be multiples of
        ``2 ** (len(channels) - 1)``.
    noise_conditioning : bool
        Add a channel holding the degradation noise level (normalised units).
    target : {"residual", "image"}
        What is diffused: the clean image minus the degraded one, or the clean image.
    prediction_type : {"epsilon", "v_prediction", "sample"}
        What the network outputs; recorded here so samplers can configure their scheduler.

    Shapes
    ------
    ``forward(x_t, timesteps, condition, noise_level)``: ``x_t`` and ``condition`` are
    ``(B, 1, D, H, W)``, ``timesteps`` is ``(B,)`` long; the output is ``(B, 1, D, H, W)``.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 32),
        attention_levels: Sequence[bool] = (False, False, False),
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
        noise_conditioning: bool = False,
        target: str = "residual",
        prediction_type: str = "v_prediction",
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet  # lazy: MONAI is heavy to import

        self.noise_conditioning = bool(noise_conditioning)
        self.target = target
        self.prediction_type = prediction_type
        self.net = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=3 if self.noise_conditioning else 2,
            out_channels=1,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=channels[-1],
        )

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        noise_level: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = [x_t, condition]
        if self.noise_conditioning:
            parts.append(noise_channel(x_t, noise_level))
        return self.net(torch.cat(parts, dim=1), timesteps=timesteps)
