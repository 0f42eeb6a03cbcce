"""Pipeline configs: typed sections, one-line errors naming file and key, shipped configs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from medgen.config import PipelineConfig, config_from_json, config_to_json, load_config
from medgen.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_config_reads_values_and_resolves_paths(tmp_path):
    path = write(
        tmp_path,
        """
        name: demo
        model: {kind: gan, noise_conditioning: true, unet: {features: [8, 8, 16, 16, 32, 8]}}
        training: {steps: 7, lr: 0.001, ema_decay: null, out_dir: runs/x}
        degradations:
          - {name: rician, params: {sigma_fraction: [0.01, 0.05]}}
        data: {train: [scans/a.nii.gz, /abs/b.nii.gz], patch_size_vox: [32, 32, 16]}
        """,
    )
    cfg = load_config(path)
    assert cfg.name == "demo"
    assert cfg.model.kind == "gan" and cfg.model.noise_conditioning is True
    assert cfg.model.unet.features == [8, 8, 16, 16, 32, 8]
    assert cfg.training.steps == 7 and cfg.training.lr == 0.001 and cfg.training.ema_decay is None
    assert cfg.training.out_dir == tmp_path / "runs" / "x"
    assert cfg.data.train == [str(tmp_path / "scans" / "a.nii.gz"), "/abs/b.nii.gz"]
    assert cfg.data.patch_size_vox == [32, 32, 16]
    assert cfg.degradations[0].params == {"sigma_fraction": [0.01, 0.05]}
    # Unset values keep their defaults.
    assert cfg.training.batch_size == PipelineConfig().training.batch_size


def test_unknown_key_names_file_and_dotted_key_with_suggestion(tmp_path):
    path = write(tmp_path, "training:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: training.stpes: unknown key (did you mean 'steps'?)"


def test_unknown_nested_key_and_top_level_key(tmp_path):
    path = write(tmp_path, "model:\n  diffusion:\n    n_sample: 3\n")
    with pytest.raises(
        ConfigError, match=r"model\.diffusion\.n_sample: unknown key \(did you mean 'n_samples'\?\)"
    ):
        load_config(path)
    path = write(tmp_path, "trainig: {}\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b\.yaml: trainig: unknown key \(did you mean 'training'\?\)$"):
        load_config(path)


def test_wrong_type_names_key_and_expectation_on_one_line(tmp_path):
    path = write(tmp_path, "training:\n  steps: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: training.steps: input should be a valid integer")
    assert message.endswith("got 'many'")
    assert "\n" not in message


def test_literal_option_and_list_length_errors(tmp_path):
    path = write(tmp_path, "model: {kind: unett}\n")
    with pytest.raises(
        ConfigError, match=r"model\.kind: input should be 'unet', 'gan', 'diffusion', 'autoencoder', 'latent_diffusion' or 'flow', got 'unett'"
    ):
        load_config(path)
    path = write(tmp_path, "data: {patch_size_vox: [32, 32]}\n", "c.yaml")
    with pytest.raises(ConfigError, match=r"data\.patch_size_vox: list should have at least 3 items"):
        load_config(path)
    path = write(tmp_path, "data: {patch_size_vox: [32, 0, 32]}\n", "d.yaml")
    with pytest.raises(ConfigError, match=r"data\.patch_size_vox\.1: input should be greater than 0, got 0"):
        load_config(path)


def test_value_rules_checked_at_load(tmp_path):
    path = write(tmp_path, "model: {diffusion: {sampling_steps: 50}}\n")
    with pytest.raises(
        ConfigError, match=r"model\.diffusion\.sampling_steps: input should be less than or equal to 20"
    ):
        load_config(path)
    path = write(tmp_path, "data: {normalisation: {mode: fixed, lower: 100, upper: -100}}\n", "e.yaml")
    with pytest.raises(
        ConfigError, match=r"data\.normalisation: `upper` must be > `lower` \(100\.0\), got -100\.0"
    ):
        load_config(path)


def test_several_errors_still_one_line(tmp_path):
    path = write(tmp_path, "training: {steps: x, lr: y}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("(and 1 more)")


def test_degradation_name_and_parameter_typos_stop_at_load(tmp_path):
    pytest.importorskip("medgen.data.degrade")
    path = write(tmp_path, "degradations:\n  - {name: rican}\n")
    with pytest.raises(ConfigError, match=r"degradations\.0: .*got 'rican' \(did you mean 'rician'\?\)"):
        load_config(path)
    path = write(tmp_path, "degradations:\n  - {name: rician, params: {sigmaa: 3.0}}\n", "f.yaml")
    with pytest.raises(
        ConfigError, match=r"degradations\.0: rician: unknown parameter 'sigmaa' \(did you mean 'sigma'\?\)"
    ):
        load_config(path)


def test_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "training: {steps: 3\n")
    with pytest.raises(ConfigError, match=r"pipe\.yaml: invalid YAML at line \d+"):
        load_config(path)
    path = write(tmp_path, "- a\n- b\n", "g.yaml")
    with pytest.raises(ConfigError, match=r"g\.yaml: <root>: expected a mapping of sections, got list"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.model.kind == "unet" and cfg.degradations == []


def test_json_round_trip_is_exact():
    cfg = PipelineConfig.model_validate(
        {"name": "x", "model": {"kind": "diffusion", "diffusion": {"n_samples": 3}}, "training": {"steps": 5}}
    )
    text = config_to_json(cfg)
    assert json.loads(text)["model"]["diffusion"]["n_samples"] == 3
    assert config_from_json(text) == cfg
    assert config_from_json(json.loads(text)) == cfg
    with pytest.raises(ConfigError, match=r"<checkpoint>: stored config is not valid JSON"):
        config_from_json("{nope")


def test_assignment_is_validated():
    cfg = PipelineConfig()
    with pytest.raises(ValueError, match="valid integer"):
        cfg.training.steps = "lots"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from medgen.stages.train import check_trainable

    from medgen.config import SYNTHESIS_KINDS

    cfg = load_config(path)
    assert cfg.name == path.stem
    if cfg.model.kind not in SYNTHESIS_KINDS:
        assert cfg.degradations, "every shipped enhancement config degrades its clean data"
    check_trainable(cfg, str(path))  # raises ConfigError on a cross-section mismatch


def test_latent_diffusion_heads_must_fit_the_middle_block():
    with pytest.raises(ValueError, match=r"middle block always attends\) must be a multiple of `num_head_channels` \(16\), got 8"):
        PipelineConfig.model_validate({"model": {"kind": "latent_diffusion", "latent_diffusion": {
            "channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 4}}})


def test_synthesis_kinds_take_the_synthesis_task_and_refuse_others():
    assert PipelineConfig.model_validate({"model": {"kind": "autoencoder"}}).model.task == "synthesis"
    with pytest.raises(ValueError, match="`task` must be synthesis for an? 'autoencoder' model, got 'denoise'"):
        PipelineConfig.model_validate({"model": {"kind": "autoencoder", "task": "denoise"}})
    with pytest.raises(ValueError, match="`perceptual` > 0 needs `perceptual_weights`"):
        PipelineConfig.model_validate({"training": {"loss": {"perceptual": 0.1}}})
