"""Exact decoding of large volumes in slabs: bounded memory, the same voxels as one pass.

Tiles decoded alone (a sliding window) do not give the whole-volume result: every GroupNorm
of the decoder would normalise with a tile's own statistics. Here the statistics are global
and the memory bounded:

1. each GroupNorm of the decoder, in order, gets its per-group mean and variance over the
   *whole* volume, accumulated slab by slab (the decoder runs on each latent slab, with a halo
   covering its receptive field, up to that norm, whose earlier norms are already frozen);
2. with every norm frozen the decoder is local, so the volume is decoded slab by slab and
   each slab's halo cropped away.

Memory is that of decoding one slab plus its halo; the price is one partial pass per norm.
The decoder is walked as plain modules (MONAI ``AutoencoderKL``: convolutions, residual
blocks, nearest up-sampling, group norms; no attention), so this module imports no model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from medgen.validate import ParameterError, check_int


class _Recorded(Exception):
    """Raised by the norm being measured: the rest of the decoder is not needed."""


@dataclass
class _Slab:
    """The latent slab being decoded: valid ``[start, stop)`` inside the chunk ``[lo, hi)``."""

    start: int = 0
    stop: int = 0
    lo: int = 0
    hi: int = 0

    def valid(self, depth: int) -> slice:
        """The valid part along axis 2 of an activation ``depth`` deep (any resolution)."""
        scale = depth // (self.hi - self.lo)
        return slice((self.start - self.lo) * scale, (self.stop - self.lo) * scale)


class _GlobalGroupNorm(nn.Module):
    """A GroupNorm that records its input's whole-volume statistics, then applies them.

    Recording keeps per-channel sums (float64) of the valid part of each slab; applying folds
    the statistics and the norm's affine into one per-channel scale and shift, so a slab costs
    one new tensor, as the norm itself does.
    """

    def __init__(self, norm: nn.GroupNorm, slab: _Slab) -> None:
        super().__init__()
        self.norm, self.slab = norm, slab
        self.recording = False
        self.sums: list[torch.Tensor] | None = None  # count, sum, sum of squares per channel
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            part = x[:, :, self.slab.valid(x.shape[2])]
            var, mean = torch.var_mean(part, dim=tuple(range(2, x.ndim)), correction=0)
            n = float(part[0, 0].numel())
            sums = [torch.tensor(n, dtype=torch.float64), mean.double() * n, (var.double() + mean.double() ** 2) * n]
            self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]
            raise _Recorded
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.shift.reshape(view), x, self.scale.reshape(view))

    def freeze(self) -> None:
        count, total, squares = self.sums
        batch, channels = total.shape
        groups = self.norm.num_groups
        per_group = count * (channels // groups)
        mean = total.reshape(batch, groups, -1).sum(-1) / per_group
        var = (squares.reshape(batch, groups, -1).sum(-1) / per_group - mean * mean).clamp_min(0.0)
        inv_std = torch.rsqrt(var + self.norm.eps).repeat_interleave(channels // groups, dim=1)
        mean = mean.repeat_interleave(channels // groups, dim=1)
        weight = self.norm.weight.double() if self.norm.affine else torch.ones(channels, dtype=torch.float64)
        bias = self.norm.bias.double() if self.norm.affine else torch.zeros(channels, dtype=torch.float64)
        scale = inv_std * weight.to(inv_std.device)
        self.scale = scale.float()
        self.shift = (bias.to(inv_std.device) - mean * scale).float()
        self.recording, self.sums = False, None


def _check_decoder(decoder: nn.Module) -> int:
    """The latent halo that covers the decoder's receptive field: each spatial convolution
    reaches ``kernel // 2`` voxels at its own resolution, i.e. that over the up-sampling
    factor so far at the latent resolution (modules in order, as a sequential decoder runs)."""
    reach, scale = 0.0, 1.0
    for module in decoder.modules():
        name = type(module).__name__
        if "Attention" in name or isinstance(module, (nn.MultiheadAttention, nn.ConvTranspose3d)):
            raise ParameterError(
                f"split decoding cannot run a decoder block of type {name} (it supports convolutions, "
                "residual blocks, group norms and nearest up-sampling)"
            )
        if isinstance(module, nn.Upsample):
            if module.mode != "nearest":
                raise ParameterError(f"split decoding needs nearest up-sampling, got {module.mode!r}")
            factor = module.scale_factor
            scale *= float(factor[0] if isinstance(factor, tuple) else factor)
        if isinstance(module, nn.Conv3d):
            if module.stride[0] != 1:
                raise ParameterError("split decoding needs stride-1 convolutions in the decoder")
            reach += (module.kernel_size[0] // 2) * module.dilation[0] / scale
    return int(math.ceil(reach))


def _swap_norms(root: nn.Module, slab: _Slab) -> list[tuple[nn.Module, str, nn.GroupNorm, _GlobalGroupNorm]]:
    """Wrap every GroupNorm under ``root``, listed in module order (the order a sequential
    decoder runs them)."""
    swapped = []
    for path, child in list(root.named_modules()):
        if isinstance(child, nn.GroupNorm):
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            wrapper = _GlobalGroupNorm(child, slab)
            setattr(parent, name, wrapper)
            swapped.append((parent, name, child, wrapper))
    return swapped


@torch.no_grad()
def split_decode(autoencoder: nn.Module, z: torch.Tensor, slab_latent_vox: int) -> torch.Tensor:
    """``autoencoder.decode(z)`` computed in slabs of ``slab_latent_vox`` latent voxels along
    the first spatial axis, with every GroupNorm using whole-volume statistics.

    Parameters
    ----------
    autoencoder : nn.Module
        MONAI ``AutoencoderKL`` (``post_quant_conv`` + ``decoder``), without attention.
    z : torch.Tensor, shape (B, C, d, h, w)
        Unscaled latents.
    slab_latent_vox : int
        Slab thickness along ``d`` at the latent resolution (a halo is added to each).

    Returns
    -------
    torch.Tensor, shape (B, 1, D, H, W)
    """
    step = check_int("slab_latent_vox", slab_latent_vox, minimum=1)
    halo = _check_decoder(autoencoder.decoder)
    depth = z.shape[2]
    slab = _Slab()
    slabs = [(start, min(start + step, depth)) for start in range(0, depth, step)]

    def run(start: int, stop: int) -> torch.Tensor:
        slab.start, slab.stop = start, stop
        slab.lo, slab.hi = max(start - halo, 0), min(stop + halo, depth)
        return autoencoder.decoder(autoencoder.post_quant_conv(z[:, :, slab.lo : slab.hi]))

    swapped = _swap_norms(autoencoder.decoder, slab)
    try:
        for _, _, _, norm in swapped:  # in the order the decoder runs them
            norm.recording = True
            for start, stop in slabs:
                try:
                    run(start, stop)
                except _Recorded:
                    pass
            norm.freeze()
        out = None
        for start, stop in slabs:
            y = run(start, stop)
            part = y[:, :, slab.valid(y.shape[2])]
            if out is None:
                scale = y.shape[2] // (slab.hi - slab.lo)
                out = y.new_empty((y.shape[0], y.shape[1], depth * scale, *y.shape[3:]))
            out[:, :, start * scale : stop * scale] = part
        return out
    finally:
        for parent, name, original, _ in swapped:
            setattr(parent, name, original)
