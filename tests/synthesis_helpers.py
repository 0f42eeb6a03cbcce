"""Tiny synthesis models for the synthesis tests, trained once per test session.

A labelled phantom cohort (3 per class, 32³ at 1.2-2 mm) on a 32³ grid of 2 mm voxels (it
covers the whole head); an autoencoder of 3 levels (latent 2 x 8³), latent diffusion
denoisers of 2 levels and tiny normalizing flows on its latents, all trained through
:func:`medgen.stages.train.train` against a real local MLflow SQLite store. The test modules
share them through :func:`models`, which builds each one on first use.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

GRID_SPACING_MM = 2.0
AE_STEPS = 30
ADVERSARIAL_START = 10
EXPERIMENT = "synthesis-test"

AUTOENCODER = (
    "{kind: autoencoder, autoencoder: {channels: [8, 16, 16], attention_levels: [false, false, false], "
    "latent_channels: 2, norm_num_groups: 8}, discriminator: {channels: 4, num_layers_d: 2}}"
)
LDM = (
    "{{kind: latent_diffusion, latent_diffusion: {{autoencoder: {autoencoder}, channels: [8, 16], "
    "attention_levels: [false, false], norm_num_groups: 8, num_head_channels: 8, num_train_timesteps: 100, "
    "sampling_steps: 4{extra}}}}}"
)


def autoencoder_yaml(out_dir: str, steps: int = AE_STEPS, start: int = ADVERSARIAL_START, extra: str = "") -> str:
    """An autoencoder pipeline on ``cohort/labels.csv`` (relative to the YAML's folder)."""
    return textwrap.dedent(f"""
        name: ae
        experiment: {EXPERIMENT}
        model: {AUTOENCODER}
        training: {{steps: {steps}, batch_size: 2, lr: 0.001, lr_schedule: cosine, checkpoint_every: {steps},
                    log_every: 1, val_every: 1000, out_dir: {out_dir}, ema_decay: null, amp: false, device: cpu,
                    loss: {{adversarial: 0.01, kl: 1.0e-6, adversarial_start_step: {start}}}{extra}}}
        data: {{labels_csv: cohort/labels.csv, val_fraction: 0.2,
                grid: {{shape_vox: [32, 32, 32], spacing_mm: {[GRID_SPACING_MM] * 3}}}}}
        """)


def ldm_yaml(
    out_dir: str,
    *,
    autoencoder: str = "ae_run/model.pt",
    steps: int = 12,
    checkpoint_every: int | None = None,
    conditioned: bool = True,
    training: str = "ddpm",
    labels_csv: str = "cohort/labels.csv",
    grid: str = "",
    ema: str = "null",
) -> str:
    """A latent diffusion pipeline (class label + ``age_years`` when ``conditioned``)."""
    extra = ", num_classes: 2, covariates: [age_years], label_dropout: 0.2" if conditioned else ""
    if training != "ddpm":
        extra += f", training: {training}"
    grid_entry = f", grid: {grid}" if grid else ""
    return textwrap.dedent(f"""
        name: ldm
        experiment: {EXPERIMENT}
        model: {LDM.format(autoencoder=autoencoder, extra=extra)}
        training: {{steps: {steps}, batch_size: 2, lr: 0.001, checkpoint_every: {checkpoint_every or steps},
                    log_every: 1, val_every: 1000, out_dir: {out_dir}, ema_decay: {ema}, amp: false, device: cpu}}
        data: {{labels_csv: {labels_csv}, val_fraction: 0.2{grid_entry}}}
        """)


def synthesis_flow_yaml(out_dir: str, *, regions: str = "null", num_classes: int = 2, steps: int = 20,
                        autoencoder: str = "ae_run/model.pt") -> str:  # fmt: skip
    """A tiny normalizing flow on the autoencoder's latents (``regions: null``: decodable)."""
    return textwrap.dedent(f"""
        name: flow
        experiment: {EXPERIMENT}
        model: {{kind: flow, flow: {{autoencoder: {autoencoder}, regions: {regions}, intensity_descriptors: false,
                 num_classes: {num_classes}, transforms: 2, hidden_features: [32], bins: 4}}}}
        training: {{steps: {steps}, batch_size: 4, lr: 0.001, checkpoint_every: {steps}, log_every: 1,
                    val_every: 1000, out_dir: {out_dir}, ema_decay: null, amp: false, device: cpu}}
        data: {{labels_csv: cohort/labels.csv}}
        """)


@dataclass
class SynthesisModels:
    """The shared cohort, MLflow store and lazily trained models (their TrainSummary)."""

    root: Path
    _built: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def cohort_csv(self) -> Path:
        if "cohort" not in self._built:
            from medgen.samples_cohort import write_cohort

            self._built["cohort"] = write_cohort(self.root / "cohort", n_per_class=3, shape=(32, 32, 32))
        return self._built["cohort"]

    def train(self, name: str, text: str):
        """Train ``text`` (a pipeline YAML) as ``<root>/<name>.yaml`` once; its TrainSummary."""
        if name not in self._built:
            from medgen.stages.train import train

            self.cohort_csv  # noqa: B018 (the cohort must exist first)
            path = self.root / f"{name}.yaml"
            path.write_text(text)
            before = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny tensors on shared cores
            try:
                self._built[name] = train(path, tracking_uri=self.uri, progress=False)
            finally:
                torch.set_num_threads(before)
        return self._built[name]

    @property
    def autoencoder(self):
        return self.train("ae", autoencoder_yaml("ae_run"))

    @property
    def ldm(self):
        """DDPM (epsilon) training, class label + ``age_years`` covariate."""
        self.autoencoder  # noqa: B018
        return self.train("ldm", ldm_yaml("ldm_run"))

    @property
    def rflow(self):
        """Rectified-flow training, unconditional."""
        self.autoencoder  # noqa: B018
        return self.train("rflow", ldm_yaml("rflow_run", conditioned=False, training="rflow", steps=6))

    @property
    def decodable_flow(self):
        """A flow over the whole latent grid (decodable), conditioned on 2 classes."""
        self.autoencoder  # noqa: B018
        return self.train("decodable-flow", synthesis_flow_yaml("decodable_flow_run"))

    @property
    def pooled_flow(self):
        """A flow over 2x2x2 pooled latent regions (an input gate: not decodable)."""
        self.autoencoder  # noqa: B018
        return self.train("pooled-flow", synthesis_flow_yaml("pooled_flow_run", regions="[2, 2, 2]", num_classes=0, steps=4))


_MODELS: dict[Path, SynthesisModels] = {}


def models(tmp_path_factory) -> SynthesisModels:
    """The session's :class:`SynthesisModels` (one folder under pytest's base temp)."""
    root = tmp_path_factory.getbasetemp() / "synthesis-models"
    if root not in _MODELS:
        root.mkdir(exist_ok=True)
        _MODELS[root] = SynthesisModels(root)
    return _MODELS[root]


def flow_yaml(out_dir: str, *, autoencoder: str = "ae_run/model.pt", steps: int = 30) -> str:
    """A tiny calibrated flow (an input gate) on the autoencoder's latents: one region, so a
    handful of features, and the raw-intensity descriptors that make scaling errors visible."""
    return textwrap.dedent(f"""
        name: flow
        experiment: {EXPERIMENT}
        model: {{kind: flow, flow: {{autoencoder: {autoencoder}, regions: [1, 1, 1], transforms: 2,
                 hidden_features: [16, 16]}}}}
        training: {{steps: {steps}, batch_size: 8, amp: false, ema_decay: null, out_dir: {out_dir}, device: cpu}}
        data: {{labels_csv: cohort/labels.csv}}
        """)
