"""Inference: sliding-window enhancement of whole volumes and diffusion sampling.

Submodules are imported on demand (this package imports nothing heavy):

* :mod:`medgen.inference.sliding`    sliding-window prediction with blended overlaps;
* :mod:`medgen.inference.schedulers` DDPM/DDIM noise schedules (no model code);
* :mod:`medgen.inference.sampling`   DDIM sampling, ensembles, uncertainty (no model code);
* :mod:`medgen.inference.grid`       grid-aligned up-sampling for super-resolution;
* :mod:`medgen.inference.enhance`    a Volume in, an enhanced Volume (same units) out;
* :mod:`medgen.inference.loading`    checkpoints and MLflow model URIs to a ready model.
"""
