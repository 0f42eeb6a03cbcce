"""Reverse diffusion (DDPM, DDIM, rectified flow) and sample ensembles with uncertainty.

A sampler sees the network only as a callable ``predict(x_t, t) -> output`` (noise, ``v`` or
sample, as the scheduler was told), so this module imports no model code. For whole volumes
``predict`` is itself a sliding-window pass (see :func:`medgen.inference.enhance`), which keeps
every step consistent across window borders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Predict = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_sample(
    predict: Predict,
    shape: Sequence[int],
    scheduler,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "sampling",
) -> torch.Tensor:
    """Run the reverse diffusion from pure noise to a sample.

    Parameters
    ----------
    predict : callable
        ``predict(x_t, t)`` returns the network output for state ``x_t`` at integer timestep
        ``t``; same shape as ``x_t``.
    shape : sequence of int
        Shape of the sample, e.g. ``(1, 1, D, H, W)``.
    scheduler
        A MONAI ``DDIMScheduler`` with its timesteps set
        (:func:`medgen.inference.schedulers.sampling_scheduler`).
    generator : torch.Generator, optional
        Source of the initial noise (CPU generator; the noise is moved to ``device``).

    Returns
    -------
    torch.Tensor
        The sample, shape ``shape``, float32 on ``device``.
    """
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)
    return reverse_diffusion(predict, x, scheduler, progress=progress, description=description)


def reverse_diffusion(
    predict: Predict,
    x: torch.Tensor,
    scheduler,
    *,
    step_generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = False,
    description: str = "sampling",
) -> torch.Tensor:
    """Walk a MONAI scheduler's timesteps from the state ``x`` (pure noise) to a sample.

    Works with ``DDIMScheduler`` (deterministic with ``eta`` 0; ``eta`` 1 adds DDPM's
    noise on its skipped schedule), ``DDPMScheduler`` (ancestral) — both drawing fresh noise
    from ``step_generator`` on ``x``'s device — and ``RFlowScheduler`` (Euler steps of the
    velocity, each to the next timestep and the last one to 0).
    """
    steps = [int(t) for t in scheduler.timesteps]
    iterator = steps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(steps, desc=description, leave=False)
    kind = type(scheduler).__name__
    for i, t in enumerate(iterator):
        output = predict(x, t).float()
        if kind == "RFlowScheduler":
            x, _ = scheduler.step(output, t, x, steps[i + 1] if i + 1 < len(steps) else 0)
        elif kind == "DDPMScheduler":
            x, _ = scheduler.step(output, t, x, generator=step_generator)
        elif eta:
            x, _ = scheduler.step(output, t, x, eta=eta, generator=step_generator)
        else:
            x, _ = scheduler.step(output, t, x)
    return x


def sample_mean_std(
    predict: Predict,
    shape: Sequence[int],
    scheduler,
    n_samples: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n_samples`` samples; return their per-voxel mean and standard deviation.

    The standard deviation (population, ``ddof=0``) is the uncertainty map: high where the
    samples disagree, i.e. where the model invents rather than recovers structure. The
    running moments use Welford's update, so memory stays at three volumes.

    Returns
    -------
    mean, std : torch.Tensor
        Each of shape ``shape``; ``std`` is zero when ``n_samples == 1``.
    """
    if n_samples < 1:
        raise ValueError(f"`n_samples` must be >= 1, got {n_samples}")
    generator = torch.Generator().manual_seed(int(seed))
    mean = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    m2 = torch.zeros_like(mean)
    for i in range(n_samples):
        sample = ddim_sample(
            predict,
            shape,
            scheduler,
            generator=generator,
            device=device,
            progress=progress,
            description=f"sample {i + 1}/{n_samples}",
        )
        delta = sample - mean
        mean += delta / (i + 1)
        m2 += delta * (sample - mean)
    return mean, torch.sqrt(m2 / n_samples)
