"""Training: patch pairs, objectives (supervised, adversarial, diffusion), the trainer,
checkpoints with exact resume, EMA, and DDP under ``torchrun``.

Submodules are imported on demand; this package imports nothing heavy.
"""
