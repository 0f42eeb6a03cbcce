"""Exact decoding of large volumes in slabs: bounded memory, the same voxels as one pass.

Tiles decoded alone (a sliding window) do not give the whole-volume result: every GroupNorm
of the decoder would normalise with a tile's own statistics. Here the decoder runs layer by
layer over the whole volume instead; each convolution (and each nearest-neighbour
up-sampling with its convolution) is computed in slabs along the first spatial axis with a
halo of the receptive field it needs, while each GroupNorm sees the whole activation. Peak
memory is a few activations of one layer, never a convolution's workspace over the whole
volume. The decoder is walked by its parts (MONAI ``AutoencoderKL``: convolutions, residual
blocks, up-sampling, group norms), so this module imports no model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medgen.validate import ParameterError, check_int


def _conv3d(module: nn.Module) -> nn.Conv3d | None:
    """The ``nn.Conv3d`` of a plain or MONAI ``Convolution`` module, else None."""
    if isinstance(module, nn.Conv3d):
        return module
    conv = getattr(module, "conv", None)
    return conv if isinstance(conv, nn.Conv3d) else None


def _halo(conv: nn.Conv3d) -> int:
    if conv.stride[0] != 1:
        raise ParameterError("split decoding needs stride-1 convolutions in the decoder")
    return (conv.kernel_size[0] // 2) * conv.dilation[0]


def _in_slabs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, halo: int, scale: int, slab: int) -> torch.Tensor:
    """``fn(x)`` computed slab by slab along axis 2 (``scale``: how much ``fn`` enlarges it)."""
    depth, out = x.shape[2], None
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        lo, hi = max(start - halo, 0), min(stop + halo, depth)
        y = fn(x[:, :, lo:hi])
        first = (start - lo) * scale
        part = y[:, :, first : first + (stop - start) * scale]
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], depth * scale, *y.shape[3:]))
        out[:, :, start * scale : stop * scale] = part
    return out


def _local(module: nn.Module, x: torch.Tensor, slab: int) -> torch.Tensor:
    """A convolution, identity or nearest up-sampling + convolution, in slabs."""
    if isinstance(module, nn.Identity):
        return x
    conv = _conv3d(module)
    if conv is not None:
        return _in_slabs(module, x, _halo(conv), 1, slab)
    upsample = getattr(module, "upsample_non_trainable", None)
    postconv = _conv3d(getattr(module, "postconv", None) or nn.Identity())
    if upsample is not None and getattr(upsample, "mode", None) == "nearest" and postconv is not None:
        factor = int(upsample.scale_factor[0] if isinstance(upsample.scale_factor, tuple) else upsample.scale_factor)
        halo = -(-_halo(postconv) // factor)  # fine-grid halo in coarse voxels, rounded up
        return _in_slabs(module, x, halo, factor, slab)
    raise ParameterError(
        f"split decoding cannot run a decoder block of type {type(module).__name__} "
        "(it supports convolutions, residual blocks, group norms and nearest up-sampling)"
    )


def _block(block: nn.Module, x: torch.Tensor, slab: int) -> torch.Tensor:
    if isinstance(block, nn.GroupNorm):
        return block(x)  # statistics over the whole volume, as in one pass
    if all(hasattr(block, name) for name in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")):
        h = _local(block.conv1, F.silu(block.norm1(x), inplace=True), slab)
        h = _local(block.conv2, F.silu(block.norm2(h), inplace=True), slab)
        return _local(block.nin_shortcut, x, slab).add_(h)
    return _local(block, x, slab)


@torch.no_grad()
def split_decode(autoencoder: nn.Module, z: torch.Tensor, slab_latent_vox: int) -> torch.Tensor:
    """``autoencoder.decode(z)``, computed in slabs of ``slab_latent_vox`` latent voxels
    (scaled with the resolution as the decoder up-samples).

    Parameters
    ----------
    autoencoder : nn.Module
        MONAI ``AutoencoderKL`` (``post_quant_conv`` + ``decoder.blocks``), without attention.
    z : torch.Tensor, shape (B, C, d, h, w)
        Unscaled latents.
    slab_latent_vox : int
        Slab thickness along ``d`` at the latent resolution.

    Returns
    -------
    torch.Tensor, shape (B, 1, D, H, W)
    """
    slab = check_int("slab_latent_vox", slab_latent_vox, minimum=1)
    x = _local(autoencoder.post_quant_conv, z, slab)
    for block in autoencoder.decoder.blocks:
        grown = x.shape[2]
        x = _block(block, x, slab)
        slab = slab * (x.shape[2] // grown)  # the same share of the volume at a finer level
    return x
