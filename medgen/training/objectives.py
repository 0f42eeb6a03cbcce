"""Training objectives: what one step computes from a model and a batch.

An objective is called as ``objective(model, batch) -> (loss, logs)`` where ``batch`` is a
dict of tensors (``"degraded"``, ``"clean"`` of shape ``(B, 1, D, H, W)``, optionally
``"noise_level"`` of shape ``(B,)``), ``loss`` is the scalar to minimise for the model's
parameters and ``logs`` maps names to floats. Any callable with that signature can drive a
:class:`~medgen.training.trainer.Trainer`; subclasses of :class:`Objective` may also keep
their own trainable state (a discriminator) which the trainer checkpoints and resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class for objectives with state.

    The trainer calls :meth:`setup` once (device, autocast, distributed wrapping), then per
    step ``forward`` (inside autocast), ``backward`` + optimiser step for the model, then
    :meth:`after_step` (e.g. the discriminator update). :meth:`extra_state` and
    :meth:`load_extra_state` carry anything beyond ``state_dict`` (optimiser states).
    """

    def setup(
        self,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
        wrap: Callable[[nn.Module], nn.Module],
    ) -> None:
        self.to(device)
        self._autocast = autocast

    def after_step(self, model: nn.Module, batch: Batch, step: int) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


def _ssim_loss(spatial_size: int):
    """MONAI 3D SSIM loss on normalised intensities, with a window that fits small patches."""
    from monai.losses import SSIMLoss  # lazy: MONAI is heavy to import

    win = 7 if spatial_size >= 7 else max(3, spatial_size | 1)
    return SSIMLoss(spatial_dims=3, data_range=1.0, win_size=win)


class SupervisedObjective(Objective):
    """``l1 * |y - x| + ssim * (1 - SSIM(y, x))`` between the model output and the clean patch."""

    def __init__(self, l1: float = 1.0, ssim: float = 0.0) -> None:
        super().__init__()
        self.l1_weight = float(l1)
        self.ssim_weight = float(ssim)
        self._ssim = None

    def reconstruction(
        self, output: torch.Tensor, clean: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logs: dict[str, float] = {}
        loss = output.new_zeros(())
        if self.l1_weight:
            l1 = F.l1_loss(output.float(), clean.float())
            logs["l1"] = float(l1.detach())
            loss = loss + self.l1_weight * l1
        if self.ssim_weight:
            if self._ssim is None:
                self._ssim = _ssim_loss(min(clean.shape[2:]))
            s = self._ssim(output.float(), clean.float())
            logs["ssim_loss"] = float(s.detach())
            loss = loss + self.ssim_weight * s
        return loss, logs

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        output = model(batch["degraded"], batch.get("noise_level"))
        loss, logs = self.reconstruction(output, batch["clean"])
        logs["loss"] = float(loss.detach())
        return loss, logs


class AdversarialObjective(SupervisedObjective):
    """Supervised loss plus a least-squares adversarial term from a patch discriminator.

    The discriminator (MONAI ``PatchDiscriminator``) and its Adam optimiser live here; the
    trainer checkpoints them through :meth:`extra_state`. The generator step uses the
    discriminator as it is; :meth:`after_step` then updates the discriminator on the
    generator's (detached) output of that step.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        l1: float = 1.0,
        ssim: float = 0.0,
        adversarial: float = 0.01,
        lr: float = 2e-4,
    ) -> None:
        super().__init__(l1=l1, ssim=ssim)
        from monai.losses import PatchAdversarialLoss  # lazy: MONAI is heavy to import

        self.discriminator = discriminator
        self.adversarial_weight = float(adversarial)
        self.d_lr = float(lr)
        self._adv = PatchAdversarialLoss(criterion="least_squares")
        self._d_opt: torch.optim.Optimizer | None = None
        self._d_model: nn.Module = discriminator
        self._fake: torch.Tensor | None = None
        self._autocast: Callable[[], AbstractContextManager] = nullcontext

    def setup(self, device, autocast, wrap) -> None:
        super().setup(device, autocast, wrap)
        self._d_model = wrap(self.discriminator)
        self._d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.d_lr, betas=(0.5, 0.999))

    def _critic(self, x: torch.Tensor) -> torch.Tensor:
        return self._d_model(x)[-1]

    def _generator_adversarial(self, output: torch.Tensor, logs: dict[str, float]) -> torch.Tensor:
        """The generator's adversarial loss on ``output`` (critic frozen for this pass)."""
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        # The unwrapped critic: no gradient for it here, so DDP must not expect one.
        critic = self.discriminator(output)[-1]
        g_adv = self._adv(critic.float(), target_is_real=True, for_discriminator=False)
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        logs["g_adv"] = float(g_adv.detach())
        return g_adv

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        output = model(batch["degraded"], batch.get("noise_level"))
        loss, logs = self.reconstruction(output, batch["clean"])
        if self.adversarial_weight:
            loss = loss + self.adversarial_weight * self._generator_adversarial(output, logs)
        self._fake = output.detach()
        logs["loss"] = float(loss.detach())
        return loss, logs

    def after_step(self, model: nn.Module, batch: Batch, step: int) -> dict[str, float]:
        if not self.adversarial_weight or self._fake is None or self._d_opt is None:
            return {}
        self._d_opt.zero_grad(set_to_none=True)
        n = self._fake.shape[0]
        with self._autocast():
            # One pass over real and fake together: a single forward per backward under DDP.
            scores = self._critic(torch.cat([batch["clean"], self._fake], dim=0)).float()
            real = self._adv(scores[:n], target_is_real=True, for_discriminator=True)
            fake = self._adv(scores[n:], target_is_real=False, for_discriminator=True)
            d_loss = 0.5 * (real + fake)
        d_loss.backward()
        self._d_opt.step()
        self._fake = None
        return {"d_loss": float(d_loss.detach())}

    def extra_state(self) -> dict[str, Any]:
        return {"d_optimizer": self._d_opt.state_dict() if self._d_opt is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self._d_opt is not None and state.get("d_optimizer") is not None:
            self._d_opt.load_state_dict(state["d_optimizer"])


def ddpm_target(scheduler, prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a DDPM-trained network should output: the noise, ``v`` or the clean sample."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


class DiffusionObjective(Objective):
    """DDPM training of a conditional denoiser (MONAI ``DDPMScheduler``).

    The diffused quantity is ``target_scale * (clean - degraded)`` (``target="residual"``) or
    ``target_scale * clean``; a timestep is drawn uniformly per sample and the network is
    trained with MSE on the scheduler's prediction type (noise, ``v`` or the sample).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        prediction_type: str = "v_prediction",
        target: str = "residual",
        target_scale: float = 1.0,
    ) -> None:
        super().__init__()
        from medgen.inference.schedulers import training_scheduler

        self.scheduler = training_scheduler(num_train_timesteps, schedule, prediction_type)
        self.prediction_type = prediction_type
        self.target = target
        self.target_scale = float(target_scale)

    def diffused(self, batch: Batch) -> torch.Tensor:
        clean = batch["clean"]
        x0 = clean - batch["degraded"] if self.target == "residual" else clean
        return x0 * self.target_scale

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.diffused(batch).float()
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.num_train_timesteps, (b,), device=x0.device).long()
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        output = model(x_t, t, batch["degraded"], batch.get("noise_level")).float()
        goal = ddpm_target(self.scheduler, self.prediction_type, x0, noise, t)
        loss = F.mse_loss(output, goal)
        return loss, {"loss": float(loss.detach())}
