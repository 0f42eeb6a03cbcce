"""Trainer: exact resume, EMA, weights-only checkpoints, patch pairs, DDP under torchrun."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from medgen.config import ModelConfig
from medgen.errors import InputError
from medgen.inference.normalise import IntensityNorm
from medgen.models import build_discriminator, build_model
from medgen.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from medgen.training.objectives import AdversarialObjective, DiffusionObjective, SupervisedObjective
from medgen.training.trainer import LAST_CHECKPOINT, Trainer
from medgen.volume import Volume
from tests.torch_helpers import TINY_UNET, TINY_DIFFUSION, one_torch_thread  # noqa: F401 (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SyntheticPairs:
    """Step-indexed batches: a smooth clean patch and a noisy copy."""

    def __init__(self, size: int) -> None:
        self.size = size

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        clean = torch.rand(1, 1, self.size, self.size, self.size, generator=g)
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
        return {"clean": clean, "degraded": noisy, "noise_level": torch.full((1,), 0.1)}


def make_trainer(kind: str, checkpoint_dir, total_steps: int = 6) -> Trainer:
    torch.manual_seed(0)
    if kind == "diffusion":
        cfg = ModelConfig(kind="diffusion", noise_conditioning=True, diffusion=TINY_DIFFUSION)
        objective, size = DiffusionObjective(num_train_timesteps=100), 16
    else:
        cfg = ModelConfig(
            kind=kind,
            noise_conditioning=True,
            unet=TINY_UNET,
            discriminator={"channels": 4, "num_layers_d": 2},
        )
        size = 32
        objective = (
            SupervisedObjective(l1=1.0, ssim=0.5)
            if kind == "unet"
            else AdversarialObjective(build_discriminator(cfg), adversarial=0.1)
        )
    return Trainer(
        build_model(cfg),
        objective,
        SyntheticPairs(size),
        total_steps=total_steps,
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=3,
        log_every=1,
    )


class NotAllowed:
    """An arbitrary class: unpickling it could run code, so weights_only refuses it."""


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["unet", "gan", "diffusion"])
def test_resume_is_exact(kind, tmp_path):
    straight = make_trainer(kind, tmp_path / "a")
    straight.fit()
    first = make_trainer(kind, tmp_path / "b")
    first.fit(until_step=3)
    # Scramble every global RNG: resume must restore them from the checkpoint.
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    resumed = make_trainer(kind, tmp_path / "b")
    assert resumed.resume() is True and resumed.step == 3
    resumed.fit()
    assert resumed.step == straight.step == 6
    assert states_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert states_equal(straight.ema.state_dict(), resumed.ema.state_dict())
    assert states_equal(
        straight.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0]
    )
    if kind == "gan":
        assert states_equal(straight.objective.state_dict(), resumed.objective.state_dict())
    # ... and training really moved the weights.
    assert not states_equal(straight.model.state_dict(), make_trainer(kind, None).model.state_dict())
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        LAST_CHECKPOINT,
        "step-0000003.pt",
        "step-0000006.pt",
    ]


def test_ema_follows_its_definition(tmp_path):
    trainer = make_trainer("unet", None)
    trainer.train_step()
    after_1 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    after_2 = trainer.model.state_dict()
    ema = {k[len("module.") :]: v for k, v in trainer.ema.state_dict().items() if k.startswith("module.")}
    for name, param in trainer.model.named_parameters():
        # The first update copies; the second decays by min(0.9, 2 / 11) (the warm-up ramp).
        expected = (2 / 11) * after_1[name] + (9 / 11) * after_2[name]
        assert torch.allclose(ema[name], expected, atol=1e-6), name
    assert trainer.inference_model is trainer.ema.module


def test_checkpoints_load_weights_only_and_refuse_pickles(tmp_path):
    trainer = make_trainer("unet", tmp_path)
    trainer.fit(until_step=3)
    raw = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)  # no pickled objects inside
    assert raw["step"] == 3 and raw["format"] == "medgen-checkpoint"
    exported = trainer.export_model(tmp_path / "model.pt")
    assert set(torch.load(exported, weights_only=True)["model"]) == set(trainer.model.state_dict())

    torch.save({"format": "medgen-checkpoint", "payload": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil\.pt: not a loadable medgen checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"missing\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match=r"not a medgen checkpoint \(no 'format' entry\)"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.normal())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.normal()) == expected


def test_non_finite_loss_stops_training():
    def bad(model, batch):
        out = model(batch["degraded"], batch["noise_level"])
        return out.mean() * float("nan"), {}

    trainer = Trainer(build_model(ModelConfig(unet=TINY_UNET)), bad, SyntheticPairs(32), total_steps=2)
    with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
        trainer.train_step()


# -- patch pairs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_volume():
    from medgen.samples import mr_brain_phantom

    image, affine = mr_brain_phantom((40, 48, 40), 3.0, seed=0)
    return Volume(image, affine)


def test_patch_pairs_are_reproducible_per_step_and_rank(phantom_volume):
    from medgen.training.patches import DegradationSpec, PatchPairs, TrainingVolume

    tv = TrainingVolume.from_volume(phantom_volume)
    spec = [DegradationSpec("rician", {"sigma_fraction": [0.02, 0.08]})]
    a = PatchPairs([tv], spec, (32, 32, 32), batch_size=2, seed=5)
    b = PatchPairs([tv], spec, (32, 32, 32), batch_size=2, seed=5)
    other_rank = PatchPairs([tv], spec, (32, 32, 32), batch_size=2, seed=5, rank=1)
    first = a.batch(4)
    assert all(torch.equal(first[k], b.batch(4)[k]) for k in first)
    assert not torch.equal(first["degraded"], a.batch(5)["degraded"])
    assert not torch.equal(first["clean"], other_rank.batch(4)["clean"])
    assert first["degraded"].shape == first["clean"].shape == (2, 1, 32, 32, 32)
    # The recorded sigma is in physical units and 2-8 % of the whole volume's robust span;
    # the network is told the same level in normalised units.
    b.batch(4)
    for params, level in zip(b.last_params, first["noise_level"].tolist()):
        sigma = params[0]["sigma"]
        assert 0.02 * tv.intensity_span <= sigma <= 0.08 * tv.intensity_span
        assert level == pytest.approx(sigma / tv.norm.scale, rel=1e-6)


def test_thick_slice_pairs_come_back_on_the_clean_grid():
    from medgen.training.patches import DegradationSpec, PatchPairs, TrainingVolume

    # Constant along k: averaging slices and resampling back must change nothing.
    ramp = np.broadcast_to(np.linspace(0, 100, 40, dtype=np.float32)[:, None, None], (40, 40, 40)).copy()
    tv = TrainingVolume.from_volume(Volume(ramp, np.diag([1.0, 1.0, 1.0, 1.0])), foreground_only=False)
    pairs = PatchPairs([tv], [DegradationSpec("thick_slices", {"factor": 2})], (32, 32, 32), batch_size=1)
    batch = pairs.batch(0)
    assert batch["degraded"].shape == (1, 1, 32, 32, 32)
    np.testing.assert_allclose(batch["degraded"].numpy(), batch["clean"].numpy(), atol=1e-5)


def test_normalisation_inverse_is_exact_for_hounsfield_units():
    hu = np.arange(-1024, 3072, dtype=np.int16).reshape(16, 16, 16)
    norm = IntensityNorm.fit(hu.astype(np.float32), "percentile", 0.5, 99.5)
    back = norm.inverse(norm.forward(hu))
    assert np.array_equal(np.rint(back).astype(np.int16), hu)
    assert norm.to_dict() == IntensityNorm.from_dict(norm.to_dict()).to_dict()
    with pytest.raises(ValueError, match=r"`scale` must be > 0, got -1"):
        IntensityNorm(0.0, -1)


# -- DDP ------------------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent("""
    import os, sys, torch
    from medgen.config import ModelConfig
    from medgen.models import build_model
    from medgen.training.distributed import init_distributed, shutdown_distributed
    from medgen.training.objectives import SupervisedObjective
    from medgen.training.trainer import Trainer

    class Pairs:
        def __init__(self, rank):
            self.rank = rank
        def batch(self, step):
            g = torch.Generator().manual_seed(100 * self.rank + step)  # different data per rank
            clean = torch.rand(1, 1, 32, 32, 32, generator=g)
            return {"clean": clean, "degraded": clean + 0.1 * torch.randn(clean.shape, generator=g)}

    dist = init_distributed("cpu")
    torch.manual_seed(dist.rank)  # different initial weights: DDP must broadcast rank 0's
    model = build_model(ModelConfig(unet={"features": [4, 4, 8, 8, 16, 4]}))
    trainer = Trainer(model, SupervisedObjective(), Pairs(dist.rank), total_steps=2, lr=1e-3,
                      ema_decay=0.9, dist=dist, checkpoint_dir=sys.argv[1], checkpoint_every=2)
    trainer.fit()
    torch.save(trainer.model.state_dict(), os.path.join(sys.argv[1], f"rank{dist.rank}.pt"))
    shutdown_distributed()
    """)


def test_ddp_two_ranks_under_torchrun_keep_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    # --standalone: a local rendezvous on a free port. Own session, so that a hang can be
    # ended with the whole process group (torchrun and both workers).
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun with 2 ranks did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert states_equal(rank0, rank1)
    # The checkpoint written by rank 0 holds both ranks' RNG states.
    ckpt = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
