"""Synthesis training through ``medgen train``: autoencoder (L1 + KL + patch-adversarial),
latent diffusion (class + covariate conditioning), exact resume, and the data they read.

The models are tiny and trained once per session (:mod:`tests.synthesis_helpers`); every
training goes through :func:`medgen.stages.train.train` against a real local MLflow store.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from medgen.config import ConfigError
from medgen.data.synthesis_data import CohortRecord, grid_affine, onto_grid, read_labels_csv, split_records
from medgen.errors import InputError
from medgen.inference.normalise import IntensityNorm
from medgen.training.checkpoint import load_checkpoint
from medgen.training.objectives_synthesis import kl_divergence
from medgen.volume import Volume
from tests.synthesis_helpers import (
    ADVERSARIAL_START,
    AE_STEPS,
    EXPERIMENT,
    GRID_SPACING_MM,
    autoencoder_yaml,
    ldm_yaml,
    models,
)
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return models(tmp_path_factory)


def tracker(synth):
    from medgen.tracking import Tracker

    return Tracker(EXPERIMENT, uri=synth.uri)


def history(synth, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in tracker(synth).client.get_metric_history(run_id, key)}


def grid_images(synth, flip: bool = False) -> np.ndarray:
    """Every cohort scan on the training grid, normalised as training does: (N, 32, 32, 32)."""
    from medgen.io import load

    images = []
    for record in read_labels_csv(synth.cohort_csv):
        values, _ = onto_grid(load(record.path), (32, 32, 32), (GRID_SPACING_MM,) * 3)
        images.append(IntensityNorm.fit(values, "percentile", 0.5, 99.5).forward(values))
    images = np.stack(images).astype(np.float32)
    return np.concatenate([images, images[:, ::-1]]) if flip else images


# -- the KL term -----------------------------------------------------------------------------


def test_kl_divergence_is_zero_for_the_prior_and_matches_the_closed_form():
    shape = (2, 3, 4, 4, 4)
    assert float(kl_divergence(torch.zeros(shape), torch.ones(shape))) == 0.0
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(shape, generator=g)
    std = torch.rand(shape, generator=g) + 0.2
    # Reference: torch.distributions, summed over latent voxels, averaged over the batch.
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    )
    expected = reference.flatten(1).sum(1).mean()
    torch.testing.assert_close(kl_divergence(mean, std), expected, rtol=1e-5, atol=1e-5)
    # Only N(0, 1) reaches zero: a shifted mean or a narrower/wider std costs something.
    assert float(kl_divergence(torch.full(shape, 0.1), torch.ones(shape))) == pytest.approx(0.5 * 0.01 * 3 * 64)
    assert float(kl_divergence(torch.zeros(shape), torch.full(shape, 0.5))) > 0
    assert float(kl_divergence(torch.zeros(shape), torch.full(shape, 2.0))) > 0


# -- autoencoder -----------------------------------------------------------------------------


def test_autoencoder_learns_to_reconstruct_the_cohort(synth):
    from medgen.inference.loading import load_model
    from medgen.models import build_model

    summary = synth.autoencoder
    assert summary.final_step == AE_STEPS and summary.model_path.is_file()
    l1 = history(synth, summary.run_id, "l1")
    assert sorted(l1) == list(range(1, AE_STEPS + 1))  # logged every step
    first, last = np.mean([l1[s] for s in (1, 2, 3)]), np.mean([l1[s] for s in range(AE_STEPS - 4, AE_STEPS + 1)])
    assert last < 0.6 * first, (first, last)

    # Whole scans on the grid (not patches): the trained weights reconstruct them at least
    # twice as well as the same network at its initial weights.
    loaded = load_model(summary.model_path)
    torch.manual_seed(loaded.config.training.seed)
    initial = build_model(loaded.config).eval()
    x = torch.from_numpy(grid_images(synth))[:, None]
    with torch.no_grad():
        trained_l1 = float((loaded.model.decode(loaded.model.encode(x)[0]) - x).abs().mean())
        initial_l1 = float((initial.decode(initial.encode(x)[0]) - x).abs().mean())
    assert trained_l1 < 0.5 * initial_l1, (trained_l1, initial_l1)
    assert {"val/psnr", "val/ssim"} <= set(summary.val_metrics)


def test_adversarial_terms_join_the_loss_only_from_adversarial_start_step(synth):
    summary = synth.autoencoder
    run = summary.run_id
    l1, kl, loss = (history(synth, run, k) for k in ("l1", "kl", "loss"))
    g_adv, d_loss = history(synth, run, "g_adv"), history(synth, run, "d_loss")
    # Logged step s is the step with 0-based index s - 1: the critic and the generator's
    # adversarial term appear from index ADVERSARIAL_START on, and never before.
    assert sorted(g_adv) == sorted(d_loss) == list(range(ADVERSARIAL_START + 1, AE_STEPS + 1))
    for step in range(1, AE_STEPS + 1):
        expected = l1[step] + 1e-6 * kl[step] + (0.01 * g_adv[step] if step in g_adv else 0.0)
        assert loss[step] == pytest.approx(expected, rel=1e-5), step
    assert all(v > 0 for v in kl.values())


def test_autoencoder_file_records_its_grid_and_no_local_paths(synth):
    summary = synth.autoencoder
    stored = json.loads(load_checkpoint(summary.model_path)["metadata_json"])
    spec = stored["synthesis"]
    assert spec["shape_vox"] == [32, 32, 32] and spec["spacing_mm"] == [GRID_SPACING_MM] * 3
    assert spec["modality"] == "MR" and spec["num_classes"] == 0 and spec["latent_shape"] == []
    assert stored["config"]["data"]["labels_csv"] is None
    assert str(synth.root) not in json.dumps(stored)
    run = tracker(synth).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.kind"] == "autoencoder"
    assert "data.labels_csv" not in run.data.params and len(run.data.params["data.sha256"]) == 64


# -- latent diffusion ------------------------------------------------------------------------


def test_latent_diffusion_stores_its_synthesis_spec_and_unit_std_latents(synth):
    from medgen.inference.loading import load_model

    summary = synth.ldm
    stored = json.loads(load_checkpoint(summary.model_path)["metadata_json"])
    spec = stored["synthesis"]
    # No grid in the LDM's config: it is the autoencoder's.
    assert spec["shape_vox"] == [32, 32, 32] and spec["spacing_mm"] == [GRID_SPACING_MM] * 3
    assert spec["latent_shape"] == [2, 8, 8, 8]
    assert spec["num_classes"] == 2 and spec["covariates"] == ["age_years"]
    ages = [r.covariates["age_years"] for r in read_labels_csv(synth.cohort_csv, ["age_years"])]
    assert spec["covariate_ranges"] == {"age_years": [min(ages), max(ages)]}  # every scan, train + val
    assert stored["autoencoder_source"] == "model.pt" and stored["autoencoder_step"] == AE_STEPS
    assert str(synth.root) not in json.dumps(stored)

    # scale_factor = 1 / std of the posterior means of every training image and its mirror.
    loaded = load_model(summary.model_path)
    assert float(loaded.model.scale_factor) == pytest.approx(stored["latent_scale_factor"], rel=1e-6)
    with torch.no_grad():
        means, _ = loaded.model.encode(torch.from_numpy(grid_images(synth, flip=True))[:, None])
    assert float(means.std()) == pytest.approx(1.0, rel=1e-3)
    assert summary.final_step == 12
    params = tracker(synth).get_run(summary.run_id).data.params
    assert params["model.latent_diffusion.num_classes"] == "2"
    assert "model.latent_diffusion.autoencoder" not in params  # a local path


def test_a_model_that_is_not_an_autoencoder_is_refused_in_one_line(synth):
    from medgen.stages.train import train

    synth.ldm  # noqa: B018 (its file is the wrong kind of model)
    path = synth.root / "ldm_on_ldm.yaml"
    path.write_text(ldm_yaml("never_run", autoencoder="ldm_run/model.pt"))
    with pytest.raises(InputError, match=r"ldm_run/model\.pt: is a latent_diffusion model, not an autoencoder$"):
        train(path, tracking_uri=synth.uri, progress=False)
    assert not (synth.root / "never_run").exists()


def test_a_label_outside_num_classes_names_the_csv_and_the_scan(synth):
    from medgen.stages.train import train

    synth.autoencoder  # noqa: B018
    lines = synth.cohort_csv.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[2].split(",")  # sub-0002, label 1
    row[header.index("label")] = "2"
    bad = [lines[0], lines[1], ",".join(row), *lines[3:]]
    (synth.cohort_csv.parent / "bad_labels.csv").write_text("\n".join(bad) + "\n")
    path = synth.root / "ldm_bad_labels.yaml"
    path.write_text(ldm_yaml("never_run", labels_csv="cohort/bad_labels.csv"))
    with pytest.raises(InputError, match=r"bad_labels\.csv: sub-0002\.nii\.gz: label 2 is outside 0\.\.1$"):
        train(path, tracking_uri=synth.uri, progress=False)


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (36, r"latent shape \(data\.grid\.shape_vox / autoencoder downsampling\)\.0: must be a multiple of 2, got 9"),
        (34, r"data\.grid\.shape_vox\.0: must be a multiple of 4, got 34"),
    ],
    ids=["latent-not-halvable", "grid-not-encodable"],
)
def test_a_grid_the_networks_cannot_take_stops_before_training(synth, side, message):
    from medgen.stages.train import train

    synth.autoencoder  # noqa: B018
    path = synth.root / f"ldm_grid{side}.yaml"
    path.write_text(ldm_yaml("never_run", grid=f"{{shape_vox: [{side}, 32, 32], spacing_mm: [2, 2, 2]}}"))
    with pytest.raises(ConfigError, match=rf"ldm_grid{side}\.yaml: {message}$"):
        train(path, tracking_uri=synth.uri, progress=False)
    assert not (synth.root / "never_run").exists()


# -- exact resume ----------------------------------------------------------------------------


def assert_same(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("kind", ["autoencoder", "latent_diffusion"])
def test_interrupted_training_resumes_bit_for_bit(synth, kind, monkeypatch):
    from medgen.stages.train import train
    from medgen.training.trainer import Trainer

    synth.autoencoder  # noqa: B018
    if kind == "autoencoder":  # the critic starts mid-way, after the interruption
        text = autoencoder_yaml("{out}", steps=4, start=3).replace("checkpoint_every: 4", "checkpoint_every: 2")
        text = text.replace("ema_decay: null", "ema_decay: 0.9")
    else:
        text = ldm_yaml("{out}", steps=4, checkpoint_every=2, ema="0.9")
    straight, stopped = synth.root / f"{kind}_straight.yaml", synth.root / f"{kind}_stopped.yaml"
    straight.write_text(text.replace("{out}", f"{kind}_straight"))
    stopped.write_text(text.replace("{out}", f"{kind}_stopped"))
    done = train(straight, tracking_uri=synth.uri, progress=False)

    original = Trainer.train_step

    def ctrl_c_after_step_2(self):
        if self.step == 2:  # the step-2 checkpoint is written: stop as Ctrl-C would
            raise KeyboardInterrupt
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_after_step_2)
        with pytest.raises(KeyboardInterrupt):
            train(stopped, tracking_uri=synth.uri, progress=False)
    ckpt_dir = synth.root / f"{kind}_stopped" / "checkpoints"
    first_run = json.loads(load_checkpoint(ckpt_dir / "last.pt")["metadata_json"])["mlflow_run_id"]
    assert tracker(synth).get_run(first_run).info.status == "KILLED"
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)  # resume must restore every RNG from the checkpoint
    resumed = train(stopped, tracking_uri=synth.uri, progress=False)

    assert (resumed.resumed_from_step, resumed.steps_done, resumed.final_step) == (2, 2, 4)
    assert resumed.run_id == first_run and tracker(synth).get_run(first_run).info.status == "FINISHED"
    a = load_checkpoint(synth.root / f"{kind}_straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(ckpt_dir / "last.pt")
    for key in ("step", "model", "ema", "optimizer", "lr_scheduler", "objective"):
        assert_same(a[key], b[key], key)
    if kind == "autoencoder":  # the discriminator and its optimiser resumed too
        assert any(k.startswith("discriminator.") for k in b["objective"]["module"])
        assert b["objective"]["extra"]["step"] == 4 and b["objective"]["extra"]["d_optimizer"]["state"]
    assert_same(load_checkpoint(done.model_path)["model"], load_checkpoint(resumed.model_path)["model"])
    # ... and the weights really moved from where they started.
    trained = a["model"]
    start = load_checkpoint(ckpt_dir / "step-0000002.pt")["model"]
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


# -- data: labels CSV, split, grid ------------------------------------------------------------


def test_read_labels_csv_reads_files_labels_and_covariates(synth):
    records = read_labels_csv(synth.cohort_csv, ["age_years", "sex"], need_label=True)
    assert [r.path.name for r in records] == [f"sub-{i:04d}.nii.gz" for i in range(1, 7)]
    assert [r.label for r in records] == [0, 1, 0, 1, 0, 1]
    assert all(r.path.is_file() and set(r.covariates) == {"age_years", "sex"} for r in records)


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("file,label\n", {}, r"labels CSV has no rows"),
        ("file,label\na.nii.gz,0\n", {"covariates": ["age"]},
         r"labels CSV has no column 'age' \(columns: file, label\)"),
        ("file,label\na.nii.gz,0\nmissing.nii.gz,1\n", {}, r"line 3: scan 'missing\.nii\.gz' does not exist"),
        ("file,label\na.nii.gz,one\n", {}, r"line 2: label must be an integer, got 'one'"),
        ("file,label,age\na.nii.gz,0,40\na.nii.gz,1,old\n", {"covariates": ["age"]},
         r"line 3: age must be a number, got 'old'"),
        ("file,label,age\na.nii.gz,0,nan\n", {"covariates": ["age"]}, r"line 2: age must be finite, got 'nan'"),
    ],
    ids=["empty", "no-column", "no-scan", "label-not-int", "covariate-not-number", "covariate-nan"],
)
def test_labels_csv_errors_name_the_file_line_and_column(tmp_path, content, kwargs, message):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "cohort.csv").write_text(content)
    with pytest.raises(InputError, match=rf"cohort\.csv: {message}$"):
        read_labels_csv(tmp_path / "cohort.csv", **kwargs)
    with pytest.raises(InputError, match=r"nowhere\.csv: labels CSV not found"):
        read_labels_csv(tmp_path / "nowhere.csv")


def test_split_records_is_deterministic_and_stratified(tmp_path):
    records = [CohortRecord(tmp_path / f"s{i}.nii.gz", label=i % 3) for i in range(30)]
    train, val = split_records(records, 0.2, seed=4)
    again_train, again_val = split_records(records, 0.2, seed=4)
    assert (train, val) == (again_train, again_val)
    assert sorted(r.path.name for r in train + val) == sorted(r.path.name for r in records)
    assert [sum(r.label == c for r in val) for c in range(3)] == [2, 2, 2]  # 20% of each class
    assert split_records(records, 0.2, seed=5)[1] != val  # another seed, another split
    assert split_records(records, 0.0) == (records, [])
    # A class with a single scan keeps it for training; a class of two gives one away.
    lone = [CohortRecord(tmp_path / "a", 0), CohortRecord(tmp_path / "b", 1), CohortRecord(tmp_path / "c", 1)]
    train, val = split_records(lone, 0.1)
    assert [r.label for r in val] == [1] and sorted(r.label for r in train) == [0, 1]


def test_grid_affine_centres_the_grid_and_keeps_the_spacing():
    affine = grid_affine((5, 6, 7), (2.0, 1.5, 3.0), (10.0, -20.0, 5.0))
    assert np.array_equal(affine[:3, :3], np.diag([2.0, 1.5, 3.0]))
    np.testing.assert_allclose(affine @ [2.0, 2.5, 3.0, 1.0], [10.0, -20.0, 5.0, 1.0])


def test_onto_grid_reorients_to_ras_keeps_the_centre_and_samples_by_position():
    # A scan stored left-to-right reversed (LAS), 2 x 2 x 3 mm, holding a ramp of world x.
    shape = (20, 18, 12)
    affine = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -15.0], [0, 0, 3.0, 4.0], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    volume = Volume((world[..., 0] + 2.0 * world[..., 2]).astype(np.float32), affine)
    values, out_affine = onto_grid(volume, (16, 16, 16), (1.5, 1.5, 1.5))
    assert values.shape == (16, 16, 16) and values.dtype == np.float32
    assert np.array_equal(out_affine[:3, :3], np.diag([1.5, 1.5, 1.5]))  # RAS, the asked spacing
    centre_in = affine @ [*(np.array(shape) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(out_affine @ [7.5, 7.5, 7.5, 1.0], centre_in)
    # A finer grid needs no smoothing: linear interpolation of a linear field is exact.
    out_ijk = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), axis=-1)
    out_world = out_ijk @ out_affine[:3, :3].T + out_affine[:3, 3]
    np.testing.assert_allclose(values, out_world[..., 0] + 2.0 * out_world[..., 2], atol=1e-3)


def test_an_autoencoder_on_a_grid_trains_on_whole_grid_volumes():
    """Patches would give GroupNorm statistics the latent diffusion model never sees."""
    from medgen.config import PipelineConfig
    from medgen.errors import ConfigError
    from medgen.stages.train_synthesis import autoencoder_training
    from medgen.training.distributed import DistInfo

    cfg = PipelineConfig.model_validate({
        "model": {"kind": "autoencoder"},
        "data": {"grid": {"shape_vox": [32, 32, 32], "spacing_mm": [2, 2, 2]}, "patch_size_vox": [16, 16, 16]},
    })  # fmt: skip
    with pytest.raises(ConfigError, match=r"cfg\.yaml: data\.patch_size_vox: with data\.grid the autoencoder trains on whole grid volumes \(\[32, 32, 32\]\)"):
        autoencoder_training(cfg, DistInfo(), "cfg.yaml")
