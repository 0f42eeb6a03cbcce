"""medgen.augment: synthetic datasets, the small classifier, and the augmentation experiment.

One tiny experiment runs once per module (phantom cohort -> autoencoder -> class-conditional
latent diffusion trained in the stage -> classifiers), logged to a real local MLflow store;
the dataset tests reuse the latent diffusion model it trained.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from medgen.augment.classifier import (
    ClassifierSettings,
    TensorBatches,
    evaluate,
    predict_scores,
    train_classifier,
)
from medgen.augment.dataset import CohortDataset, SyntheticDataset
from medgen.stages.augment import AugmentStep, run_augment_experiment
from medgen.errors import ConfigError
from medgen.validate import ParameterError

TINY_AE = {
    "model": {"kind": "autoencoder",
              "autoencoder": {"channels": [8, 16, 16], "latent_channels": 2, "norm_num_groups": 8},
              "discriminator": {"channels": 8, "num_layers_d": 2}},
    "training": {"steps": 4, "batch_size": 2, "ema_decay": None, "device": "cpu"},
}  # fmt: skip
TINY_LDM = {
    "model": {"kind": "latent_diffusion",
              "latent_diffusion": {"channels": [16, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                                   "num_head_channels": 8, "sampling_steps": 3}},
    "training": {"steps": 4, "batch_size": 2, "device": "cpu"},
}  # fmt: skip
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The stage end to end at toy size; returns (result, tracking uri, output folder)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("augment")
    for name, preset in (("ae.yaml", TINY_AE), ("ldm.yaml", TINY_LDM)):
        (root / name).write_text(yaml.safe_dump(preset))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    step = {
        "out": str(root / "out"),
        "cohort": {"n_per_class": 4, "seed": 0, "task": "ventricles", "shape_vox": [32, 32, 32]},
        "autoencoder_config": str(root / "ae.yaml"),
        "latent_diffusion_config": str(root / "ldm.yaml"),
        "n_train_per_class": 2,
        "n_test_per_class": 2,
        "ratios": [1.0],
        "seeds": SEEDS,
        "classifier": {"steps": 3, "batch_size": 4, "block_inplanes": [4, 4, 8, 8]},
        "device": "cpu",
    }
    result = run_augment_experiment(step, tracking_uri=uri, experiment="augment-test")
    return result, uri, root / "out"


@pytest.fixture(scope="module")
def ldm(experiment):
    return str(experiment[2] / "generator" / "latent_diffusion" / "model.pt")


# -- SyntheticDataset ------------------------------------------------------------------------


def test_items_have_the_documented_keys_shapes_and_types(ldm):
    ds = SyntheticDataset(ldm, n=3, condition={"label": 1}, seed=0)
    assert len(ds) == 3
    item = ds[2]
    assert set(item) == {"image", "label", "synthetic", "seed", "index"}
    assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (1, 32, 32, 32)
    assert (item["label"], item["synthetic"], item["seed"], item["index"]) == (1, True, 0, 2)
    assert torch.isfinite(item["image"]).all()
    raw = ds.volume(2)  # the model's units; percentile normalisation maps p0.5..p99.5 to 0..1
    lo, hi = np.percentile(raw.values(np.float32), [0.5, 99.5])
    assert np.allclose(item["image"][0].numpy(), (raw.values(np.float32) - lo) / (hi - lo), atol=1e-5)
    none = SyntheticDataset(ldm, n=3, condition={"label": 1}, seed=0, normalise="none")
    assert torch.equal(none[2]["image"][0], torch.from_numpy(raw.values(np.float32)))


def test_same_seed_same_items_other_seed_other_items_and_n_does_not_matter(ldm):
    a = SyntheticDataset(ldm, n=2, condition={"label": 0}, seed=5)
    b = SyntheticDataset(ldm, n=4, condition={"label": 0}, seed=5)
    c = SyntheticDataset(ldm, n=2, condition={"label": 0}, seed=6)
    assert torch.equal(a[1]["image"], b[1]["image"])  # same seed, different n
    assert torch.equal(a[0]["image"], b[0]["image"])
    assert not torch.equal(a[1]["image"], c[1]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_cache_writes_marked_synthetic_files_and_returns_identical_items(ldm, tmp_path, monkeypatch):
    import nibabel as nib

    from medgen.io.nifti import read_nifti

    plain = SyntheticDataset(ldm, n=2, condition={"label": 1}, seed=3)
    cached = SyntheticDataset(ldm, n=2, condition={"label": 1}, seed=3, cache_dir=tmp_path)
    first = cached[1]["image"]
    folder = tmp_path / cached.cache_key
    nifti, sidecar = folder / "synth-00001.nii.gz", folder / "synth-00001.json"
    assert nifti.is_file() and sidecar.is_file() and not (folder / "synth-00000.nii.gz").exists()
    assert read_nifti(nifti).meta.acquisition["synthetic"] is True
    assert bytes(nib.load(nifti).header["descrip"]).startswith(b"SYNTHETIC")  # the header itself
    side = json.loads(sidecar.read_text())
    assert side["synthetic"] is True and side["synthesis"]["seed"] == 3 and side["synthesis"]["index"] == 1
    assert json.loads((folder / "key.json").read_text())["model_sha256"] == cached.model_sha256
    assert torch.equal(first, plain[1]["image"])  # cached or not: the same volume
    # A second dataset reads the file: generating is now an error, and the bytes are equal.
    from medgen.inference.loading import SynthesisModel

    monkeypatch.setattr(SynthesisModel, "generate", lambda *a, **k: pytest.fail("regenerated a cached item"))
    again = SyntheticDataset(ldm, n=2, condition={"label": 1}, seed=3, cache_dir=tmp_path)
    assert again.cache_key == cached.cache_key
    assert torch.equal(again[1]["image"], first)
    other = SyntheticDataset(ldm, n=2, condition={"label": 0}, seed=3, cache_dir=tmp_path)
    assert other.cache_key != cached.cache_key


def test_concat_with_real_scans_goes_through_a_dataloader_with_a_worker(ldm, experiment):
    synth = SyntheticDataset(ldm, n=2, condition={"label": 1}, seed=0)
    real = CohortDataset(experiment[2] / "split" / "train.csv", synth.shape_vox, synth.spacing_mm)
    assert len(real) == 4 and real[0]["synthetic"] is False and real[0]["seed"] == -1
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([real, synth]), batch_size=3,
                                         num_workers=1)  # fmt: skip
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (6, 1, 32, 32, 32) and images.dtype == torch.float32
    assert torch.cat([b["synthetic"] for b in batches]).tolist() == [False] * 4 + [True] * 2
    assert torch.cat([b["label"] for b in batches])[4:].tolist() == [1, 1]
    assert torch.equal(images[5], synth[1]["image"])  # made in the worker = made here


def test_bad_condition_fails_at_construction_with_one_line(ldm):
    with pytest.raises(ParameterError, match=r"unknown condition 'lable' \(did you mean 'label'\?\)"):
        SyntheticDataset(ldm, n=2, condition={"lable": 1})
    with pytest.raises(ParameterError, match=r"condition `label` must be in 0\.\.1, got 5"):
        SyntheticDataset(ldm, n=2, condition={"label": 5})
    with pytest.raises(ParameterError, match=r"`sampler` must be one of .*did you mean 'ddim'"):
        SyntheticDataset(ldm, n=2, condition={"label": 1}, sampler="ddin")


# -- classifier ------------------------------------------------------------------------------


def _cubes(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise volumes; label 1 holds a bright 4^3 cube at a random place (detectable, not
    a global intensity shift)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, (2 * n_per_class, 1, 16, 16, 16)).astype(np.float32)
    y = np.tile([0, 1], n_per_class)
    for i in np.flatnonzero(y):
        a, b, c = rng.integers(2, 10, 3)
        x[i, 0, a : a + 4, b : b + 4, c : c + 4] += 2.0
    return x, y


def test_classifier_learns_a_separable_task_and_evaluate_matches_hand_auc():
    torch.set_num_threads(1)
    x, y = _cubes(16, seed=0)
    settings = ClassifierSettings(block_inplanes=(4, 8, 8, 8), batch_size=8)
    model = train_classifier(x, y, steps=40, seed=0, settings=settings)
    x_test, y_test = _cubes(10, seed=1)
    result = evaluate(model, x_test, y_test)
    assert result["auc"] > 0.9
    scores = predict_scores(model, x_test)
    pos, neg = scores[y_test == 1], scores[y_test == 0]
    hand = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert result["auc"] == pytest.approx(hand, abs=1e-12)
    assert result["accuracy"] == pytest.approx(np.mean((scores > 0) == (y_test == 1)))
    again = train_classifier(x, y, steps=40, seed=0, settings=settings)  # repeatable
    assert np.array_equal(predict_scores(again, x_test), scores)


def test_batches_depend_only_on_seed_and_step():
    x, y = _cubes(4, seed=0)
    a, b = TensorBatches(x, y, seed=1), TensorBatches(x, y, seed=1)
    assert torch.equal(a.batch(3)["image"], b.batch(3)["image"])
    assert torch.equal(a.batch(3)["label"], b.batch(3)["label"])
    assert not torch.equal(a.batch(3)["image"], a.batch(4)["image"])
    with pytest.raises(ParameterError, match="`labels` must hold both classes"):
        TensorBatches(x, np.zeros(len(x)))


# -- the experiment --------------------------------------------------------------------------


def test_experiment_rows_are_paired_and_summarised(experiment):
    result, _, out = experiment
    arms = ["real", "synth-1x", "synth-only"]
    assert [(r["arm"], r["seed"]) for r in result.rows] == [(a, s) for s in SEEDS for a in arms]
    by = {(r["arm"], r["seed"]): r for r in result.rows}
    for seed in SEEDS:
        synth, alone, real = by[("synth-1x", seed)], by[("synth-only", seed)], by[("real", seed)]
        assert synth["auc_diff"] == pytest.approx(synth["auc"] - real["auc"])
        assert alone["accuracy_diff"] == pytest.approx(alone["accuracy"] - real["accuracy"])
        assert (real["n_real"], real["n_synthetic"], real["auc_diff"]) == (4, 0, None)
        assert (synth["n_real"], synth["n_synthetic"], alone["n_real"], alone["n_synthetic"]) == (4, 4, 0, 4)
    arms = result.summary["arms"]
    aucs = [by[("real", s)]["auc"] for s in SEEDS]
    assert arms["real"]["auc_mean"] == pytest.approx(np.mean(aucs))
    assert arms["real"]["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    diffs = [by[("synth-1x", s)]["auc_diff"] for s in SEEDS]
    assert arms["synth-1x"]["auc_diff_mean"] == pytest.approx(np.mean(diffs))
    assert arms["synth-1x"]["verdict"] in ("helps", "hurts", "no clear difference")
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and table[0]["auc_diff"] == "" and float(table[1]["auc"]) == pytest.approx(result.rows[1]["auc"], rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["arms"]["synth-1x"]["n_synthetic"] == 4
    # the generator saw the training split only
    train = {row["file"] for row in csv.DictReader(open(out / "split" / "train.csv"))}
    test = {row["file"] for row in csv.DictReader(open(out / "split" / "test.csv"))}
    assert len(train) == 4 and len(test) == 4 and not train & test
    assert yaml.safe_load((out / "generator" / "autoencoder.yaml").read_text())["data"]["labels_csv"].endswith("train.csv")


def test_experiment_logs_metrics_and_table_to_mlflow(experiment):
    from mlflow.tracking import MlflowClient

    result, uri, _ = experiment
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("real/auc_mean", "real/auc_std", "real/accuracy_mean", "real/accuracy_std",
                 "synth-1x/auc_mean", "synth-1x/auc_diff_mean", "synth-1x/auc_diff_std",
                 "synth-1x/accuracy_diff_mean", "time/classifier_train_seconds_mean"):  # fmt: skip
        assert name in metrics, name
    assert metrics["synth-1x/auc_diff_mean"] == pytest.approx(result.summary["arms"]["synth-1x"]["auc_diff_mean"])
    per_seed = client.get_metric_history(result.run_id, "real/auc")
    assert sorted(m.step for m in per_seed) == SEEDS
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "augment")}
    assert artifacts == {"augment/results.csv", "augment/summary.json"}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    names = sorted(c.info.run_name for c in children)
    assert [n.split(":")[:3] for n in names] == [["train", "medgen", "autoencoder"], ["train", "medgen", "latent_diffusion"]]
    assert "out" not in run.data.params and run.data.params["ratios"] == "[1.0]"


def test_step_model_refuses_bad_settings_with_one_line():
    with pytest.raises(ConfigError, match=r"augment: ratios\.0: .*greater than 0"):
        run_augment_experiment({"out": "x", "cohort": {}, "synthesis_model": "m.pt", "ratios": [0]})
    with pytest.raises(ConfigError, match="exactly one of `labels_csv`"):
        run_augment_experiment({"out": "x", "labels_csv": "a.csv", "cohort": {}, "synthesis_model": "m.pt"})
    with pytest.raises(ConfigError, match="n_trian_per_class"):
        run_augment_experiment({"out": "x", "cohort": {}, "synthesis_model": "m.pt", "n_trian_per_class": 3})
    step = AugmentStep(out="x", cohort={"n_per_class": 40}, synthesis_model="latest")
    with pytest.raises(ConfigError, match="needs a train stage before it"):
        run_augment_experiment(step)


def test_a_grid_other_than_the_models_is_refused(experiment, ldm, tmp_path):
    _, uri, out = experiment
    step = {"out": str(tmp_path / "o"), "labels_csv": str(out / "cohort" / "labels.csv"), "synthesis_model": ldm,
            "grid": {"shape_vox": [16, 16, 16], "spacing_mm": [2, 2, 2]}, "n_train_per_class": 2,
            "n_test_per_class": 2, "seeds": [0], "device": "cpu"}  # fmt: skip
    with pytest.raises(ParameterError, match=r"`grid` .*differs from the synthesis model's grid .*\[32, 32, 32\]"):
        run_augment_experiment(step, tracking_uri=uri, experiment="augment-test")


def test_the_shipped_pipeline_and_presets_validate():
    from pathlib import Path

    from medgen.config import load_config

    root = Path(__file__).resolve().parents[1]
    pipeline = yaml.safe_load((root / "pipelines" / "augment-classifier.yaml").read_text())
    step = AugmentStep.model_validate(pipeline["stages"][0]["augment"])
    assert step.ratios == [1.0, 2.0] and len(step.seeds) >= 5 and step.cohort is not None
    for preset in (step.autoencoder_config, step.latent_diffusion_config):
        assert load_config(root / "pipelines" / preset).model.kind in ("autoencoder", "latent_diffusion")
