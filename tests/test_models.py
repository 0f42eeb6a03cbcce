"""Model registry, residual U-Net, GAN critic, conditional diffusion and the DDIM sampler."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen.config import ModelConfig, PipelineConfig
from medgen.models import build_discriminator, build_model, count_parameters
from medgen.models.unet import noise_channel
from tests.torch_helpers import TINY_UNET, TINY_DIFFUSION, one_torch_thread  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_residual_unet_starts_as_identity_and_adds_its_output():
    model = build_model(ModelConfig(kind="unet", unet=TINY_UNET))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), x)
        model.net.final_conv.bias.fill_(0.25)  # weights stay zero: net(x) == 0.25 everywhere
        assert torch.allclose(model(x), x + 0.25, atol=1e-6)


def test_noise_conditioning_adds_an_input_channel_that_matters():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(kind="unet", unet=TINY_UNET))
    cond = build_model(ModelConfig(kind="unet", unet=TINY_UNET, noise_conditioning=True))
    assert cond.net.conv_0.conv_0.conv.in_channels == 2
    assert plain.net.conv_0.conv_0.conv.in_channels == 1
    with torch.no_grad():
        torch.nn.init.normal_(cond.net.final_conv.weight, std=0.1)
        x = torch.randn(1, 1, 32, 32, 32)
        assert not torch.allclose(cond(x, 0.05), cond(x, 0.3))


def test_noise_channel_values_and_shape_errors():
    x = torch.zeros(3, 1, 2, 2, 2)
    channel = noise_channel(x, torch.tensor([0.1, 0.2, 0.3]))
    assert channel.shape == (3, 1, 2, 2, 2)
    assert torch.allclose(channel[:, 0, 1, 1, 1], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(noise_channel(x, None), torch.zeros(3, 1, 2, 2, 2))
    assert torch.allclose(noise_channel(x, 0.5), torch.full((3, 1, 2, 2, 2), 0.5))
    with pytest.raises(ValueError, match=r"`noise_level` needs 1 or 3 values, got 2"):
        noise_channel(x, torch.tensor([0.1, 0.2]))


def test_gan_generator_is_the_residual_unet_and_critic_scores_patches():
    cfg = ModelConfig(kind="gan", unet=TINY_UNET, discriminator={"channels": 4, "num_layers_d": 2})
    generator = build_model(cfg)
    assert type(generator).__name__ == "ResidualUNet"
    critic = build_discriminator(PipelineConfig(model=cfg))
    outputs = critic(torch.randn(2, 1, 32, 32, 32))
    assert outputs[-1].shape[:2] == (2, 1)
    assert all(s > 1 for s in outputs[-1].shape[2:])  # a map of patch scores, not one number


def test_width_follows_config():
    small = count_parameters(build_model(ModelConfig(unet=TINY_UNET)))
    large = count_parameters(build_model(ModelConfig(unet={"features": [8, 8, 16, 16, 32, 8]})))
    assert 0 < small < large


def test_diffusion_model_sees_the_condition():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="diffusion", noise_conditioning=True, diffusion=TINY_DIFFUSION))
    assert model.target == "residual" and model.prediction_type == "v_prediction"
    x_t = torch.randn(2, 1, 16, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        for p in model.parameters():  # MONAI zero-initialises the output convolution
            if not p.any():
                torch.nn.init.normal_(p, std=0.1)
        a = model(x_t, t, torch.zeros_like(x_t), 0.1)
        b = model(x_t, t, torch.ones_like(x_t), 0.1)
    assert a.shape == x_t.shape
    assert not torch.allclose(a, b)


# -- samplers: no model code, DDIM correctness ----------------------------------------------

SAMPLER_MODULES = ("medgen/inference/sampling.py", "medgen/inference/schedulers.py")


@pytest.mark.parametrize("relative", SAMPLER_MODULES)
def test_sampler_sources_import_no_model_code(relative):
    tree = ast.parse((REPO / relative).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    forbidden = [m for m in imported if m.startswith(("medgen.models", "monai.networks.nets"))]
    assert forbidden == []


def test_importing_samplers_loads_no_medgen_model_module():
    code = (
        "import sys, medgen.inference.sampling, medgen.inference.schedulers\n"
        "s = medgen.inference.schedulers.sampling_scheduler(5, 100)\n"
        "print(sorted(m for m in sys.modules if m.startswith('medgen.models')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_ddim_with_an_oracle_lands_on_the_target():
    from medgen.inference.sampling import ddim_sample
    from medgen.inference.schedulers import sampling_scheduler

    target = torch.linspace(-2, 2, 64).reshape(1, 1, 4, 4, 4)
    scheduler = sampling_scheduler(8, 1000, "scaled_linear_beta", "sample")
    out = ddim_sample(
        lambda x, t: target, target.shape, scheduler, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(out, target, atol=1e-5)


def test_ensemble_mean_and_std_match_numpy():
    from medgen.inference.sampling import ddim_sample, sample_mean_std
    from medgen.inference.schedulers import sampling_scheduler

    scheduler = sampling_scheduler(4, 100, "linear_beta", "sample")

    def predict(x, t):  # a "network" whose answer depends on the noise it is given
        return 0.5 * x + 1.0

    mean, std = sample_mean_std(predict, (1, 1, 3, 3, 3), scheduler, 5, seed=7)
    generator = torch.Generator().manual_seed(7)
    samples = np.stack(
        [ddim_sample(predict, (1, 1, 3, 3, 3), scheduler, generator=generator).numpy() for _ in range(5)]
    )
    np.testing.assert_allclose(mean.numpy(), samples.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), samples.std(0), rtol=1e-4, atol=1e-6)
    assert float(std.min()) > 0
    with pytest.raises(ValueError, match=r"`n_samples` must be >= 1, got 0"):
        sample_mean_std(predict, (1, 1, 3, 3, 3), scheduler, 0)


def test_sampling_scheduler_refuses_bad_step_counts():
    from medgen.inference.schedulers import sampling_scheduler

    with pytest.raises(ValueError, match=r"`num_inference_steps` must be in \[1, 100\], got 0"):
        sampling_scheduler(0, 100)
    assert len(sampling_scheduler(20, 1000).timesteps) == 20
