"""``evaluate-synthesis``: the feature encoder's training and files, the grid helper, the
report end to end on tiny NIfTI folders, a real local MLflow store, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from scipy import ndimage
from typer.testing import CliRunner

from medgen.errors import InputError
from medgen.io.nifti import write_nifti
from medgen.metrics.features import FEATURE_SPACE
from medgen.stages.evaluate_synthesis import (
    ENCODER_ARTIFACT_DIR,
    REPORT_ARTIFACT,
    evaluate_synthesis,
    load_feature_encoder,
    load_folder,
    normalise_percentiles,
    register,
    synthesis_report,
    train_feature_encoder,
    volumes_on_grid,
)
from medgen.tracking import Tracker
from medgen.validate import ParameterError
from medgen.volume import Volume
from tests.torch_helpers import one_torch_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth(seed: int, shape=(16, 16, 16)) -> np.ndarray:
    v = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return ((v - v.min()) / (v.max() - v.min()) * 1000.0).astype(np.float32)


def bumps(shape, spacing_mm: float) -> np.ndarray:
    """A smooth function of position (mm, centred grid) sampled on ``shape`` x ``spacing_mm``."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * spacing_mm for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    first = np.exp(-((x - 2) ** 2 + y**2 + (z + 1) ** 2) / 18.0)
    second = 0.5 * np.exp(-((x + 3) ** 2 + (y - 2) ** 2) / 8.0)
    return (first + second).astype(np.float32)


def write(folder: Path, name: str, array: np.ndarray, affine=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_nifti(Volume(array, np.eye(4) if affine is None else affine), folder / name)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """real: 6 volumes; train: 5; synth: 4, of which s1 is an exact copy of train t2, s2 is
    stored left-right/antero-posterior flipped (LPS) and s3 on a finer grid (32^3 x 0.5 mm)."""
    root = tmp_path_factory.mktemp("synthesis")
    for i in range(6):
        write(root / "real", f"r{i}.nii.gz", smooth(100 + i))
    train = [smooth(200 + i) for i in range(5)]
    for i, t in enumerate(train):
        write(root / "train", f"t{i}.nii.gz", t)
    write(root / "synth", "s0.nii.gz", smooth(300))
    write(root / "synth", "s1.nii.gz", train[2])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [15.0, 15.0, 0.0]
    write(root / "synth", "s2.nii.gz", smooth(301)[::-1, ::-1].copy(), lps)
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] = -0.25  # the same field of view as the 16^3 x 1 mm grid
    write(root / "synth", "s3.nii.gz", ndimage.zoom(smooth(302), 2, order=1), fine)
    (root / "empty").mkdir()
    write(root / "single", "only.nii.gz", smooth(400))
    return {name: root / name for name in ("real", "train", "synth", "empty", "single")}


@pytest.fixture(scope="module")
def first_run(folders, store, tmp_path_factory):
    """One end-to-end run (encoder trained here for 3 steps), shared by several tests."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("report") / "report.json"
    parent = Tracker("synthesis-test", uri=store).start_run("pipeline")
    report = evaluate_synthesis(
        folders["synth"], folders["real"], folders["train"], tracking_uri=store, parent_run_id=parent,
        experiment="synthesis-test", out=out, encoder_steps=3,
    )
    return report, out, parent


# -- encoder: training, determinism, files ---------------------------------------------------


def test_encoder_training_is_deterministic_under_a_seed_and_files_round_trip(tmp_path):
    vols = np.stack([normalise_percentiles(smooth(i)) for i in range(5)])
    a = train_feature_encoder(vols, steps=3, batch_size=4, feature_dim=16, seed=0)
    b = train_feature_encoder(vols, steps=3, batch_size=4, feature_dim=16, seed=0, out_path=tmp_path / "b.pt")
    c = train_feature_encoder(vols, steps=3, batch_size=4, feature_dim=16, seed=1)
    fa = a.features(vols)
    assert fa.shape == (5, 16)
    assert np.array_equal(fa, b.features(vols)) and a.fingerprint() == b.fingerprint()
    assert not np.allclose(fa, c.features(vols))
    assert a.provenance["steps"] == 3 and a.provenance["seed"] == 0 and a.provenance["n_volumes"] == 5
    loaded = load_feature_encoder(tmp_path / "b.pt")
    assert np.array_equal(loaded.features(vols), fa)
    assert loaded.fingerprint() == a.fingerprint() and loaded.provenance == b.provenance
    payload = torch.load(tmp_path / "b.pt", weights_only=True)
    assert json.loads(payload["metadata_json"])["feature_space"] == FEATURE_SPACE


def test_loading_another_kind_of_model_file_is_one_line_naming_it(tmp_path):
    from medgen.training.trainer import save_model_file

    path = save_model_file(tmp_path / "unet.pt", torch.nn.Linear(2, 2), {"kind": "unet"})
    with pytest.raises(InputError, match=r"unet.pt: not a medgen feature encoder \(kind 'unet'\)"):
        load_feature_encoder(path)
    with pytest.raises(InputError, match=r"missing.pt: checkpoint file not found"):
        load_feature_encoder(tmp_path / "missing.pt")


def test_encoder_training_validates_its_volumes():
    with pytest.raises(ParameterError, match=r"`volumes` must hold at least 2 volumes"):
        train_feature_encoder(np.zeros((1, 16, 16, 16)), steps=1)
    with pytest.raises(ParameterError, match=r"`steps` must be an integer >= 1, got 0"):
        train_feature_encoder(np.zeros((2, 16, 16, 16)), steps=0)


# -- grid and normalisation -----------------------------------------------------------------


def test_volumes_land_on_the_first_volumes_grid(folders):
    loaded = load_folder(folders["synth"], "SYNTH_DIR")
    assert [p.name for p, _ in loaded] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz", "s3.nii.gz"]
    prepared = volumes_on_grid(loaded, (16, 16, 16), (1.0, 1.0, 1.0))
    assert prepared.shape == (4, 16, 16, 16) and prepared.min() >= 0.0 and prepared.max() <= 1.0
    # The LPS-stored volume is reoriented exactly; the fine one resampled closely.
    assert np.array_equal(prepared[2], normalise_percentiles(smooth(301)))
    assert np.abs(prepared[3] - normalise_percentiles(smooth(302))).mean() < 0.02


def test_onto_grid_resamples_by_position_in_millimetres():
    from medgen.data.synthesis_data import grid_affine, onto_grid

    def volume(shape, spacing):
        return Volume(bumps(shape, spacing), grid_affine(shape, (spacing,) * 3, (0.0, 0.0, 0.0)))

    coarse = bumps((16, 16, 16), 1.0)
    from_fine, _ = onto_grid(volume((32, 32, 32), 0.5), (16, 16, 16), (1.0, 1.0, 1.0))
    assert np.abs(from_fine - coarse).max() < 0.05  # anti-aliased before decimation
    # A larger field of view is cropped around the centre.
    from_wide, _ = onto_grid(volume((24, 24, 24), 1.0), (16, 16, 16), (1.0, 1.0, 1.0))
    assert np.allclose(from_wide, coarse, atol=1e-5)


def test_normalise_percentiles_maps_to_unit_range_and_handles_constants():
    v = np.random.default_rng(0).normal(size=(10, 10, 10)) * 50 + 300
    n = normalise_percentiles(v)
    assert n.dtype == np.float32 and n.min() == 0.0 and n.max() == 1.0
    assert np.mean(n == 0.0) == pytest.approx(0.005, abs=0.002)
    assert not normalise_percentiles(np.full((4, 4, 4), 7.0)).any()


# -- the report end to end --------------------------------------------------------------------


def test_end_to_end_report_json_and_mlflow(first_run, store):
    report, out, parent = first_run
    written = json.loads(out.read_text())
    assert written["run_id"] == report["run_id"]
    metrics = written["metrics"]
    for key in ("fid", "mmd_rbf", "mmd_linear", "two_sample_auc"):
        assert np.isfinite(metrics[f"synthesis/{key}_medgen3d"])
    assert 0.0 <= metrics["synthesis/two_sample_auc_medgen3d"] <= 1.0
    assert 0.0 < metrics["synthesis/diversity_msssim_synth"] < 1.0
    assert 0.0 < metrics["synthesis/diversity_msssim_real"] < 1.0
    assert written["feature_space"]["encoder_source"] == "trained here on the train volumes (seed 0, 3 steps)"
    assert "not an ImageNet/Inception or Med3D" in written["feature_space"]["description"]
    assert written["files"]["synth"] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz", "s3.nii.gz"]
    assert written["counts"] == {"synth": 4, "real": 6, "train": 5}
    # s1 is train t2, voxel for voxel: flagged, with its source named.
    copy = written["memorisation"]["samples"][1]
    assert copy["flagged"] and copy["nearest_train"] == 2 and copy["max_ncc_train"] == 2
    assert copy["feature_distance"] == pytest.approx(0.0, abs=1e-9) and copy["max_ncc"] == pytest.approx(1.0)
    assert Path(written["feature_space"]["encoder_file"]).name == "report.encoder.pt"

    tracker = Tracker("synthesis-test", uri=store)
    run = tracker.get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["medgen.stage"] == "evaluate-synthesis"
    assert run.data.params["feature_space"] == FEATURE_SPACE
    fingerprint = written["feature_space"]["encoder_fingerprint"]
    assert run.data.params["feature_space.encoder_fingerprint"] == fingerprint
    assert run.data.metrics["synthesis/fid_medgen3d"] == pytest.approx(metrics["synthesis/fid_medgen3d"])
    assert run.data.metrics["synthesis/memorisation_fraction_flagged"] >= 0.25
    artifacts = {a.path for a in tracker.client.list_artifacts(report["run_id"])}
    assert {REPORT_ARTIFACT, ENCODER_ARTIFACT_DIR} <= artifacts
    logged_path = tracker.client.download_artifacts(report["run_id"], REPORT_ARTIFACT)
    logged = json.loads(Path(logged_path).read_text())
    assert "files" not in logged  # file names stay local
    assert logged["metrics"] == pytest.approx(metrics)


def test_reusing_the_encoder_file_reproduces_the_numbers(first_run, folders, store):
    report, out, _ = first_run
    again = evaluate_synthesis(
        folders["synth"], folders["real"], folders["train"], encoder=report["feature_space"]["encoder_file"],
        tracking_uri=store, experiment="synthesis-test",
    )
    assert again["feature_space"]["encoder_source"] == "file report.encoder.pt"
    assert again["feature_space"]["encoder_fingerprint"] == report["feature_space"]["encoder_fingerprint"]
    assert again["metrics"] == pytest.approx(report["metrics"])


def test_synthesis_report_without_train_and_on_arrays():
    vols = np.stack([normalise_percentiles(smooth(i)) for i in range(8)])
    torch.manual_seed(0)
    from medgen.metrics.features import FeatureEncoder

    enc = FeatureEncoder(feature_dim=8, channels=(4, 8))
    report = synthesis_report(vols[:4], vols[4:], None, enc)
    assert report["memorisation"] is None
    assert "synthesis/memorisation_fraction_flagged" not in report["metrics"]
    assert report["reference_real_split"]["n_per_half"] == 2
    assert any("rank-deficient" in note for note in report["notes"])
    with pytest.raises(ParameterError, match=r"`real` volumes must be on the grid of `synth`"):
        synthesis_report(vols[:4], vols[4:, :8], None, enc)


# -- one-line errors and the command --------------------------------------------------------


def test_folder_errors_name_the_folder(folders):
    empty = rf"{folders['empty']}: --real holds no NIfTI files \(.nii, .nii.gz\)"
    with pytest.raises(InputError, match=empty):
        load_folder(folders["empty"], "--real")
    single = rf"{folders['single']}: --train holds 1 NIfTI volume; at least 2 are needed"
    with pytest.raises(InputError, match=single):
        evaluate_synthesis(folders["synth"], folders["real"], folders["single"], encoder_steps=1)
    with pytest.raises(InputError, match=r"SYNTH_DIR must be a folder"):
        load_folder(folders["synth"] / "s0.nii.gz", "SYNTH_DIR")


def test_command_runs_and_reports(first_run, folders, store, tmp_path):
    report, _, _ = first_run
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    runner = CliRunner()
    help_text = runner.invoke(app, ["evaluate-synthesis", "--help"]).output
    assert "--real" in help_text and "--train" in help_text and "--encoder" in help_text
    result = runner.invoke(
        app,
        [
            "evaluate-synthesis", str(folders["synth"]), "--real", str(folders["real"]),
            "--encoder", report["feature_space"]["encoder_file"], "--tracking-uri", store,
            "--experiment", "synthesis-test", "--out", str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "synthesis/fid_medgen3d = " in result.output and (tmp_path / "r.json").is_file()
    bad = runner.invoke(app, ["evaluate-synthesis", str(folders["empty"]), "--real", str(folders["real"])])
    assert isinstance(bad.exception, InputError) and "holds no NIfTI files" in str(bad.exception)
