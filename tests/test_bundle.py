"""Local MONAI model-zoo latent diffusion bundles (``medgen.models.bundle``), offline.

The bundle written here is a tiny copy of the layout of MONAI's
``brain_image_synthesis_latent_diffusion_model``: ``configs/inference.json`` with
``autoencoder_def``/``diffusion_def``/``scheduler``, ``$`` expressions for the noise, the
conditioning and the weight paths, four covariates fed as cross-attention context *and* as
extra input channels (``in_channels`` = latent channels + 4), and the diffusion weights stored
with the old ``generative`` package's key names (the real bundle's ``load_old: 1``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen.errors import InputError
from tests.torch_helpers import one_torch_thread  # noqa: F401  (fixture)

COVARIATES = ["gender", "age", "ventricular_vol", "brain_vol"]
AE_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 3, "channels": [8, 16, 16],
           "num_res_blocks": 1, "norm_num_groups": 8, "norm_eps": 1e-6, "attention_levels": [False, False, False],
           "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}  # fmt: skip
DM_ARGS = {"spatial_dims": 3, "in_channels": 7, "out_channels": 3, "channels": [8, 16], "num_res_blocks": 1,
           "attention_levels": [False, True], "norm_num_groups": 8, "norm_eps": 1e-6, "resblock_updown": True,
           "num_head_channels": [0, 8], "with_conditioning": True, "transformer_num_layers": 1,
           "cross_attention_dim": 4, "upcast_attention": True, "use_flash_attention": False}  # fmt: skip
LATENT = (3, 4, 4, 4)  # the decoded grid is 16^3: three autoencoder levels halve twice


def inference_config() -> dict:
    """configs/inference.json in the brain bundle's key layout (legacy names in the autoencoder)."""
    autoencoder = {"_target_": "generative.networks.nets.AutoencoderKL", **AE_ARGS,
                   "spatial_dims": "@spatial_dims", "latent_channels": "@latent_channels"}  # fmt: skip
    autoencoder["num_channels"] = autoencoder.pop("channels")  # the generative package's name
    return {
        "imports": ["$import torch", "$from pathlib import Path"],
        "bundle_root": ".",
        "load_old": 1,
        "model_dir": "$@bundle_root + '/models'",
        "spatial_dims": 3,
        "latent_channels": 3,
        "gender": 0.0,
        "age": 0.1,
        "ventricular_vol": 0.2,
        "brain_vol": 0.4,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
        "autoencoder_def": autoencoder,
        "network_def": "@autoencoder_def",
        "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
        "load_autoencoder": "$@autoencoder_def.load_old_state_dict(torch.load(@load_autoencoder_path))",
        "diffusion_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **DM_ARGS},
        "load_diffusion_path": "$@model_dir + '/diffusion_model.pt'",
        "load_diffusion": "$@diffusion_def.load_old_state_dict(torch.load(@load_diffusion_path))",
        "scheduler": {
            "_target_": "monai.networks.schedulers.DDIMScheduler",
            "_requires_": ["@load_diffusion", "@load_autoencoder"],
            "beta_start": 0.0015, "beta_end": 0.0205, "num_train_timesteps": 1000,
            "schedule": "scaled_linear_beta", "clip_sample": False,
        },  # fmt: skip
        "noise": "$torch.randn((1, 3, 4, 4, 4)).to(@device)",
        "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=20)",
        "sampler": {"_target_": "scripts.sampler.Sampler", "_requires_": "@set_timesteps"},
        "sample": "$@sampler.sampling_fn(@noise, @autoencoder, @diffusion, @scheduler, @conditioning)",
    }


METADATA = {
    "version": "1.0.0",
    "task": "Brain image synthesis",
    "image_classes": "T1w head MRI with 2x2x2 mm voxel size",
    "network_data_format": {
        "inputs": {"image": {"type": "tabular", "channel_def": {"0": "Gender", "1": "Age", "2": "Ventricular volume",
                                                                  "3": "Brain volume"}}},
        "outputs": {"pred": {"type": "image", "value_range": [0, 1], "modality": "MR", "spatial_shape": [16, 16, 16]}},
    },
}  # fmt: skip


def old_generative_keys(state: dict) -> dict:
    """A MONAI DiffusionModelUNet state dict under the generative package's key names."""
    out = {}
    for key, value in state.items():
        if "transformer_blocks" in key and ".out_proj." in key:
            key = key.replace(".out_proj.", ".to_out.0.")
        out[key.replace("postconv", "conv")] = value
    return out


def write_bundle(folder: Path, config: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A bundle in ``folder``; returns the (seeded, random) autoencoder and UNet saved in it."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    torch.manual_seed(7)
    autoencoder, unet = AutoencoderKL(**AE_ARGS).eval(), DiffusionModelUNet(**DM_ARGS).eval()
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(config or inference_config(), indent=4))
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=4))
    torch.save(autoencoder.state_dict(), folder / "models" / "autoencoder.pt")
    torch.save(old_generative_keys(unet.state_dict()), folder / "models" / "diffusion_model.pt")
    return autoencoder, unet


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("bundles") / "brain_ldm"
    autoencoder, unet = write_bundle(folder)
    yield folder, autoencoder, unet
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(bundle):
    from medgen.inference.loading import load_bundle

    return load_bundle(bundle[0])


def test_reads_grid_conditions_and_scheduler_from_the_configs(synth):
    spec, settings = synth.spec, synth.settings
    assert spec.shape_vox == [16, 16, 16] and spec.latent_shape == list(LATENT)
    assert spec.spacing_mm == [2.0, 2.0, 2.0]  # from metadata "2x2x2 mm"
    assert spec.covariates == COVARIATES and all(spec.covariate_ranges[c] == [0.0, 1.0] for c in COVARIATES)
    assert (spec.num_classes, spec.units, spec.modality) == (0, "arbitrary", "MR")
    assert (spec.intensity_offset, spec.intensity_scale) == (0.0, 1.0)
    assert (settings.training, settings.sampler, settings.steps) == ("ddpm", "ddim", 20)
    assert (settings.schedule, settings.prediction_type, settings.num_train_timesteps) == ("scaled_linear_beta", "epsilon", 1000)
    assert settings.schedule_args == {"beta_start": 0.0015, "beta_end": 0.0205}
    assert float(synth.model.scale_factor) == 1.0  # the bundle decodes its latents unscaled
    assert synth.spec.covariate_defaults == {"gender": 0.0, "age": 0.1, "ventricular_vol": 0.2, "brain_vol": 0.4}


def test_generates_a_marked_synthetic_volume_deterministically(synth):
    from medgen.inference.synthesis import SynthesisRequest

    request = SynthesisRequest(n=1, condition={"age": 0.5}, steps=3, seed=4)
    (volume,) = synth.generate(request)
    values = volume.values(np.float32)
    assert values.shape == tuple(synth.spec.shape_vox) and np.isfinite(values).all()
    assert volume.meta.acquisition["synthetic"] is True
    record = volume.meta.acquisition["synthesis"]
    assert record["condition"]["age"] == 0.5 and record["steps"] == 3 and record["sampler"] == "ddim"
    np.testing.assert_array_equal(synth.generate(request)[0].values(np.float32), values)
    other = synth.generate(SynthesisRequest(n=1, condition={"age": 0.5}, steps=3, seed=5))[0]
    assert not np.array_equal(other.values(np.float32), values)


def test_weights_come_from_the_files(bundle, synth, one_torch_thread):
    _, autoencoder, unet = bundle
    torch.manual_seed(0)
    z = torch.randn(1, *LATENT)
    with torch.no_grad():
        torch.testing.assert_close(synth.model.decode(z), autoencoder.decode(z), rtol=0, atol=0)
        covariates = torch.tensor([[1.0, 0.5, 0.25, 0.75]])
        t = torch.tensor([500])
        planes = covariates[:, :, None, None, None].expand(1, 4, *LATENT[1:])
        expected = unet(torch.cat([z, planes], 1), timesteps=t, context=covariates[:, None, :])
        torch.testing.assert_close(synth.model(z, t, None, covariates), expected, rtol=0, atol=0)


def test_load_synthesis_model_dispatches_to_bundles(bundle):
    from medgen.inference.loading import load_synthesis_model

    loaded = load_synthesis_model(bundle[0])
    assert loaded.source == str(bundle[0]) and loaded.spec.covariates == COVARIATES


def test_synthesize_stage_writes_nifti_and_sidecar(bundle, tmp_path, one_torch_thread):
    from medgen.stages.synthesize import synthesize

    summary = synthesize(bundle[0], tmp_path / "out", n=1, steps=2, device="cpu", progress=False,
                         tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    (path,) = summary.paths
    assert path.name.endswith(".nii.gz") and path.is_file()
    sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    assert "synthetic" in json.dumps(sidecar).lower()
    assert summary.records[0]["steps"] == 2 and summary.run_id


def _broken(tmp_path: Path, bundle_folder: Path, change) -> Path:
    folder = tmp_path / "broken_bundle"
    shutil.copytree(bundle_folder, folder)
    change(folder)
    return folder


def _edit_config(edit):
    def change(folder: Path) -> None:
        config = inference_config()
        edit(config)
        (folder / "configs" / "inference.json").write_text(json.dumps(config))

    return change


def _unlink_weights(folder: Path) -> None:
    for path in (folder / "models").glob("*.pt"):
        path.unlink()


def _wrong_weights(folder: Path) -> None:
    from monai.networks.nets import AutoencoderKL

    torch.save(AutoencoderKL(**{**AE_ARGS, "channels": [8, 8, 8]}).state_dict(), folder / "models" / "autoencoder.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / "configs" / "inference.json").unlink(), r"no JSON config in configs/"),
        (lambda f: (f / "configs" / "inference.json").write_text('{"age": 0.1}'), r"defines no AutoencoderKL network"),
        (lambda f: (f / "configs" / "inference.json").write_text("{not json"), r"inference\.json: not valid JSON"),
        (_unlink_weights, r"bundle has no weights"),
        (lambda f: (f / "models" / "diffusion_model.pt").unlink(), r"no weights for 'diffusion_def'"),
        (_wrong_weights, r"weights do not match 'autoencoder_def' in configs/inference\.json"),
        (_edit_config(lambda c: c["diffusion_def"].update(_target_="scripts.evil.UNet")),
         r"unsupported _target_ 'scripts\.evil\.UNet'"),
        (_edit_config(lambda c: c["autoencoder_def"].update(num_channels="$[8, 16, 16]")),
         r"'autoencoder_def\.num_channels' is a Python expression"),
        (_edit_config(lambda c: c["diffusion_def"].update(num_heads=2)),
         r"'diffusion_def\.num_heads' is not an argument of MONAI's DiffusionModelUNet"),
        (_edit_config(lambda c: c["autoencoder_def"].update(spatial_dims=2)), r"3D volumes only"),
        (_edit_config(lambda c: c["scheduler"].update(_target_="monai.networks.schedulers.RFlowScheduler")),
         r"'scheduler' has unsupported _target_"),
        (_edit_config(lambda c: c["scheduler"].update(schedule="warped_beta")), r"scheduler values cannot be used"),
    ],
    ids=["no-config", "no-networks", "bad-json", "no-weights", "one-missing", "wrong-weights", "bad-target",
         "expression", "unknown-argument", "2d", "scheduler", "schedule"],
)  # fmt: skip
def test_errors_are_one_line_naming_the_bundle(bundle, tmp_path, change, message, one_torch_thread):
    from medgen.inference.loading import load_bundle

    folder = _broken(tmp_path, bundle[0], change)
    with pytest.raises(InputError, match=message) as caught:
        load_bundle(folder)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_legacy_generative_scheduler_names(bundle, tmp_path, one_torch_thread):
    """The generative-era bundle: generative.* scheduler target, ``beta_schedule``, .pth files."""
    from medgen.inference.loading import load_bundle

    def legacy(folder: Path) -> None:
        config = inference_config()
        config["scheduler"] = {"_target_": "generative.networks.schedulers.DDPMScheduler", "beta_start": 0.0015,
                               "beta_end": 0.0205, "num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}
        config["load_diffusion_path"] = "$@model_dir + '/diffusion_model.pth'"
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
        (folder / "models" / "diffusion_model.pt").rename(folder / "models" / "diffusion_model.pth")

    synth = load_bundle(_broken(tmp_path, bundle[0], legacy))
    assert (synth.settings.sampler, synth.settings.schedule) == ("ddpm", "scaled_linear_beta")


def test_brats_style_layout(bundle, tmp_path, one_torch_thread):
    """The BraTS bundle's variant: the UNet under ``network_def``, ``latent_shape`` with an
    ``@`` reference, ``noise_scheduler``, ``models/model_autoencoder.pt`` + ``models/model.pt``,
    no conditioning."""
    from monai.networks.nets import DiffusionModelUNet

    from medgen.inference.synthesis import SynthesisRequest
    from medgen.inference.loading import load_bundle

    def brats(folder: Path) -> None:
        config = inference_config()
        for key in ("diffusion_def", "conditioning", "noise", "gender", "age", "ventricular_vol", "brain_vol"):
            del config[key]
        unconditional = {**DM_ARGS, "in_channels": 3, "with_conditioning": False, "cross_attention_dim": None}
        config["network_def"] = {"_target_": "generative.networks.nets.DiffusionModelUNet", **unconditional}
        config["latent_shape"] = ["@latent_channels", 4, 4, 4]
        config["noise_scheduler"] = config.pop("scheduler")
        config["load_autoencoder_path"] = "$@bundle_root + '/models/model_autoencoder.pt'"
        config["load_diffusion_path"] = "$@model_dir + '/model.pt'"
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
        (folder / "models" / "autoencoder.pt").rename(folder / "models" / "model_autoencoder.pt")
        (folder / "models" / "diffusion_model.pt").unlink()
        torch.save(DiffusionModelUNet(**unconditional).state_dict(), folder / "models" / "model.pt")

    synth = load_bundle(_broken(tmp_path, bundle[0], brats))
    assert synth.spec.covariates == [] and synth.spec.latent_shape == list(LATENT)
    (volume,) = synth.generate(SynthesisRequest(n=1, steps=2))
    assert volume.shape[:3] == (16, 16, 16) and np.isfinite(volume.values(np.float32)).all()
