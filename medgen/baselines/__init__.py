"""Classical baselines that learned models are compared with: denoising and super-resolution."""
