"""Objectives of the synthesis models, on the contract of :mod:`medgen.training.objectives`.

* :class:`AutoencoderObjective`: L1 + KL (+ perceptual, only with a local weights file)
  + least-squares patch-adversarial loss against MONAI's ``PatchDiscriminator``; batches
  carry ``"clean"`` images ``(B, 1, D, H, W)``.
* :class:`LatentDiffusionObjective`: DDPM (noise / ``v`` / sample prediction) or rectified
  flow (velocity ``x0 - noise``) on scaled latents; batches carry ``"latent_mean"`` and
  ``"latent_std"`` ``(B, C, d, h, w)`` (a fresh posterior sample every step) and optionally
  ``"class_label"`` ``(B,)`` and ``"covariates"`` ``(B, n)``.
* :class:`FlowObjective`: negative log-likelihood per feature of a normalizing flow on the
  latent posterior means (plus ``"descriptors"`` ``(B, K)`` when the flow takes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medgen.training.objectives import AdversarialObjective, Batch, Objective, ddpm_target
from medgen.training.trainer import unwrap


def kl_divergence(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) summed over latent voxels, averaged over the batch.

    Examples
    --------
    >>> float(kl_divergence(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)))
    0.0
    """
    var = std.float().pow(2)
    kl = 0.5 * (mean.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(dim=1).mean()


def perceptual_loss(network: str, weights: str | Path) -> nn.Module:
    """MONAI ``PerceptualLoss`` (2.5D, on slices) from a local weights file; never downloads."""
    from monai.losses import PerceptualLoss  # lazy: MONAI is heavy to import

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: perceptual-loss weights file not found")
    return PerceptualLoss(
        spatial_dims=3, network_type=network, is_fake_3d=True, fake_3d_ratio=0.25,
        pretrained=True, pretrained_path=str(path),
    )  # fmt: skip


class AutoencoderObjective(AdversarialObjective):
    """``l1 * |x' - x| + kl * KL + perceptual * P(x', x) + adversarial * G_adv(x')``.

    The discriminator update (:meth:`after_step`), its optimiser state and checkpointing are
    the GAN's (:class:`~medgen.training.objectives.AdversarialObjective`); the adversarial
    terms start at ``adversarial_start_step`` so the reconstruction settles first.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        l1: float = 1.0,
        kl: float = 1e-6,
        adversarial: float = 0.01,
        lr: float = 2e-4,
        perceptual: float = 0.0,
        perceptual_module: nn.Module | None = None,
        adversarial_start_step: int = 0,
    ) -> None:
        super().__init__(discriminator, l1=l1, ssim=0.0, adversarial=adversarial, lr=lr)
        self.kl_weight = float(kl)
        self.perceptual_weight = float(perceptual)
        if self.perceptual_weight and perceptual_module is None:
            raise ValueError("`perceptual` > 0 needs a perceptual-loss module built from local weights")
        self.perceptual = perceptual_module
        self.adversarial_start_step = int(adversarial_start_step)
        self._step = 0

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        clean = batch["clean"]
        recon, mean, std = model(clean)
        loss, logs = self.reconstruction(recon, clean)
        kl = kl_divergence(mean, std)
        logs["kl"] = float(kl.detach())
        loss = loss + self.kl_weight * kl
        if self.perceptual_weight and self.perceptual is not None:
            p = self.perceptual(recon.float(), clean.float())
            logs["perceptual"] = float(p.detach())
            loss = loss + self.perceptual_weight * p
        if self.adversarial_weight and self._step >= self.adversarial_start_step:
            loss = loss + self.adversarial_weight * self._generator_adversarial(recon, logs)
            self._fake = recon.detach()
        else:
            self._fake = None  # no critic update before the adversarial terms start
        logs["loss"] = float(loss.detach())
        return loss, logs

    def after_step(self, model: nn.Module, batch: Batch, step: int) -> dict[str, float]:
        self._step = step + 1
        return super().after_step(model, batch, step)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "step": self._step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self._step = int(state.get("step", 0))


class LatentDiffusionObjective(Objective):
    """Denoising loss of a latent diffusion model on posterior samples of its latents.

    ``training="ddpm"``: MONAI ``DDPMScheduler`` noising, MSE on ``prediction_type``;
    ``training="rflow"``: MONAI ``RFlowScheduler``, ``x_t = (1 - t/T) x0 + (t/T) noise``
    and MSE on the velocity ``x0 - noise``. With ``label_dropout`` > 0 the class label is
    replaced by the "no class" index that often, training the unconditional model that
    classifier-free guidance needs.
    """

    def __init__(
        self,
        training: str = "ddpm",
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        prediction_type: str = "epsilon",
        num_classes: int = 0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from medgen.inference.schedulers import rflow_scheduler, training_scheduler

        self.training_kind = training
        if training == "rflow":
            scheduler = rflow_scheduler(num_train_timesteps)
        else:
            scheduler = training_scheduler(num_train_timesteps, schedule, prediction_type)
        # Kept out of the module tree: it holds no weights, and MONAI's RFlowScheduler skips
        # nn.Module.__init__, so registering it breaks ``.to(device)``.
        object.__setattr__(self, "scheduler", scheduler)
        self.prediction_type = prediction_type
        self.num_classes = int(num_classes)
        self.label_dropout = float(label_dropout)

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = (batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"])).float()
        noise = torch.randn_like(x0)
        labels = batch.get("class_label")
        if labels is not None and self.num_classes and self.label_dropout:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if self.training_kind == "rflow":
            t = self.scheduler.sample_timesteps(x0)
            x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
            goal = x0 - noise
        else:
            t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device).long()
            x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
            goal = ddpm_target(self.scheduler, self.prediction_type, x0, noise, t)
        output = model(x_t, t, labels, batch.get("covariates")).float()
        loss = F.mse_loss(output, goal)
        return loss, {"loss": float(loss.detach())}


class FlowObjective(Objective):
    """Exact maximum likelihood: mean negative log-likelihood per feature (nats) of every
    scan's posterior-mean latents, smoothed by ``feature_noise``. Means, not posterior
    samples: the gate scores means, and a sample's spread within a region is dominated by
    the posterior noise (measured: 67 vs 1.5 nats per feature)."""

    def __init__(self, feature_noise: float = 0.0) -> None:
        super().__init__()
        self.feature_noise = float(feature_noise)

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        latents = batch["latent_mean"].float()
        # Spline flows need float32: a bf16 log-determinant is too coarse to train on.
        with torch.autocast(latents.device.type, enabled=False):
            log_prob = model(latents, batch.get("descriptors"), batch.get("class_label"), self.feature_noise)
        dim = unwrap(model).dim
        loss = -log_prob.mean() / dim
        return loss, {"loss": float(loss.detach()), "nll_per_dim": float(loss.detach())}
