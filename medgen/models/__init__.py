"""Networks built from config: a registry over MONAI networks.

``build_model(cfg)`` returns the module used at inference for every kind (the residual
generator for ``unet``/``gan``, the conditional denoiser for ``diffusion``);
``build_discriminator(cfg)`` returns the GAN critic.
"""

from medgen.models.registry import MODEL_KINDS, build_discriminator, build_model, count_parameters

__all__ = ["MODEL_KINDS", "build_discriminator", "build_model", "count_parameters"]
