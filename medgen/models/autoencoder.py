"""The 3D KL autoencoder of latent diffusion: MONAI ``AutoencoderKL`` built from config."""

from __future__ import annotations

from torch import nn

from medgen.config import AutoencoderConfig


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """MONAI ``AutoencoderKL`` for one-channel 3D volumes.

    Shapes
    ------
    ``encode(x)`` takes ``(B, 1, D, H, W)`` with every side a multiple of
    ``cfg.downsample_factor`` and returns the posterior mean and standard deviation, each
    ``(B, latent_channels, D/f, H/f, W/f)``; ``decode(z)`` maps back to ``(B, 1, D, H, W)``.
    ``forward(x)`` returns ``(reconstruction, mean, std)``.
    """
    from monai.networks.nets import AutoencoderKL  # lazy: MONAI is heavy to import

    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_nonlocal_attention,
        with_decoder_nonlocal_attn=cfg.with_nonlocal_attention,
    )
