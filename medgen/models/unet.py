"""Residual 3D U-Net: ``output = input + net(input)``, optionally told the noise level."""

from __future__ import annotations

import torch
from torch import nn


class ResidualUNet(nn.Module):
    """MONAI ``BasicUNet`` predicting a correction that is added to its input.

    The global residual means an untrained (zero-output) network is the identity, and the
    network only has to learn the degradation, not the anatomy.

    Parameters
    ----------
    features : sequence of 6 int
        ``BasicUNet`` feature counts (five encoder levels and the last decoder level).
    noise_conditioning : bool
        If True the network gets a second input channel filled with the noise level
        (in normalised intensity units), so one model serves a range of noise levels.
    dropout : float
    upsample : str
        ``BasicUNet`` up-sampling mode.

    Shapes
    ------
    ``forward(x, noise_level)``: ``x`` is ``(B, 1, D, H, W)``; ``noise_level`` is a float, or a
    tensor of shape ``(B,)``; the output has the shape of ``x``. ``D, H, W`` should be multiples
    of 16 (four poolings).
    """

    def __init__(
        self,
        features: tuple[int, ...] = (8, 8, 16, 32, 64, 8),
        noise_conditioning: bool = False,
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet  # lazy: MONAI is heavy to import

        self.noise_conditioning = bool(noise_conditioning)
        self.net = BasicUNet(
            spatial_dims=3,
            in_channels=2 if self.noise_conditioning else 1,
            out_channels=1,
            features=tuple(features),
            dropout=dropout,
            upsample=upsample,
        )
        # Start as the identity: the last 1x1x1 convolution outputs zeros.
        nn.init.zeros_(self.net.final_conv.weight)
        if self.net.final_conv.bias is not None:
            nn.init.zeros_(self.net.final_conv.bias)

    def forward(self, x: torch.Tensor, noise_level: float | torch.Tensor | None = None) -> torch.Tensor:
        inputs = x
        if self.noise_conditioning:
            inputs = torch.cat([x, noise_channel(x, noise_level)], dim=1)
        return x + self.net(inputs)


def noise_channel(x: torch.Tensor, noise_level: float | torch.Tensor | None) -> torch.Tensor:
    """A ``(B, 1, *spatial)`` channel holding each sample's noise level (0 when unknown)."""
    b = x.shape[0]
    if noise_level is None:
        level = torch.zeros(b, device=x.device, dtype=x.dtype)
    else:
        level = torch.as_tensor(noise_level, device=x.device, dtype=x.dtype).reshape(-1)
        if level.numel() == 1:
            level = level.expand(b)
        elif level.numel() != b:
            raise ValueError(f"`noise_level` needs 1 or {b} values, got {level.numel()}")
    return level.view(b, 1, *([1] * (x.ndim - 2))).expand(b, 1, *x.shape[2:])
