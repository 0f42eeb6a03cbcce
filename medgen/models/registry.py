"""Build networks from :class:`medgen.config.ModelConfig`: one builder per model kind."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medgen.config import ModelConfig, PipelineConfig

MODEL_KINDS = ("unet", "gan", "diffusion", "autoencoder", "latent_diffusion", "flow")


def _residual_unet(cfg: ModelConfig) -> nn.Module:
    from medgen.models.unet import ResidualUNet

    return ResidualUNet(
        features=tuple(cfg.unet.features),
        noise_conditioning=cfg.noise_conditioning,
        dropout=cfg.unet.dropout,
        upsample=cfg.unet.upsample,
    )


def _diffusion(cfg: ModelConfig) -> nn.Module:
    from medgen.models.diffusion import ConditionalDiffusionUNet

    d = cfg.diffusion
    return ConditionalDiffusionUNet(
        channels=tuple(d.channels),
        attention_levels=tuple(d.attention_levels),
        num_res_blocks=d.num_res_blocks,
        norm_num_groups=d.norm_num_groups,
        noise_conditioning=cfg.noise_conditioning,
        target=d.target,
        prediction_type=d.prediction_type,
    )


def _autoencoder(cfg: ModelConfig) -> nn.Module:
    from medgen.models.autoencoder import build_autoencoder

    return build_autoencoder(cfg.autoencoder)


def _latent_diffusion(cfg: ModelConfig) -> nn.Module:
    from medgen.models.autoencoder import build_autoencoder
    from medgen.models.latent_diffusion import LatentDenoiser, LatentDiffusionModel

    ld = cfg.latent_diffusion
    denoiser = LatentDenoiser(
        latent_channels=cfg.autoencoder.latent_channels,
        channels=tuple(ld.channels),
        attention_levels=tuple(ld.attention_levels),
        num_res_blocks=ld.num_res_blocks,
        norm_num_groups=ld.norm_num_groups,
        num_head_channels=ld.num_head_channels,
        num_classes=ld.num_classes,
        num_covariates=len(ld.covariates),
    )
    return LatentDiffusionModel(build_autoencoder(cfg.autoencoder), denoiser)


def flow_latent_shape(cfg: PipelineConfig) -> list[int]:
    """The latent grid a flow models: ``data.grid`` divided by the autoencoder's downsampling."""
    if not isinstance(cfg, PipelineConfig) or cfg.data.grid is None:
        raise ValueError("a flow model is built from the whole pipeline config with `data.grid` set")
    factor = cfg.model.autoencoder.downsample_factor
    return [s // factor for s in cfg.data.grid.shape_vox]


def _flow(cfg: PipelineConfig) -> nn.Module:
    from medgen.data.scan_descriptors import DESCRIPTOR_NAMES
    from medgen.models.autoencoder import build_autoencoder
    from medgen.models.flow import LatentFlow

    f = cfg.model.flow
    return LatentFlow(
        build_autoencoder(cfg.model.autoencoder),
        latent_channels=cfg.model.autoencoder.latent_channels,
        latent_shape=flow_latent_shape(cfg),
        regions=f.regions,
        num_descriptors=len(DESCRIPTOR_NAMES) if f.intensity_descriptors else 0,
        transforms=f.transforms,
        hidden_features=f.hidden_features,
        bins=f.bins,
        num_classes=f.num_classes,
    )


# The GAN's generator is the supervised residual U-Net; its critic is built separately.
_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "unet": _residual_unet,
    "gan": _residual_unet,
    "diffusion": _diffusion,
    "autoencoder": _autoencoder,
    "latent_diffusion": _latent_diffusion,
}


def _model_section(cfg: ModelConfig | PipelineConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, PipelineConfig) else cfg


def build_model(cfg: ModelConfig | PipelineConfig) -> nn.Module:
    """The network of ``cfg.model.kind``, freshly initialised.

    Parameters
    ----------
    cfg : ModelConfig or PipelineConfig

    Returns
    -------
    torch.nn.Module
        ``unet``/``gan``: :class:`~medgen.models.unet.ResidualUNet`;
        ``diffusion``: :class:`~medgen.models.diffusion.ConditionalDiffusionUNet`;
        ``autoencoder``: MONAI ``AutoencoderKL``; ``latent_diffusion``:
        :class:`~medgen.models.latent_diffusion.LatentDiffusionModel` (the autoencoder, whose
        architecture is ``model.autoencoder``, inside); ``flow``:
        :class:`~medgen.models.flow.LatentFlow` (needs the whole config: ``data.grid``).
    """
    model_cfg = _model_section(cfg)
    if model_cfg.kind == "flow":  # needs the whole config: its grid fixes the feature count
        return _flow(cfg)
    return _BUILDERS[model_cfg.kind](model_cfg)


def build_discriminator(cfg: ModelConfig | PipelineConfig) -> nn.Module:
    """MONAI ``PatchDiscriminator`` judging ``(B, 1, D, H, W)`` patches (``gan``, ``autoencoder``)."""
    from monai.networks.nets import PatchDiscriminator  # lazy: MONAI is heavy to import

    d = _model_section(cfg).discriminator
    return PatchDiscriminator(
        spatial_dims=3,
        channels=d.channels,
        in_channels=1,
        out_channels=1,
        num_layers_d=d.num_layers_d,
        norm="INSTANCE",
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
