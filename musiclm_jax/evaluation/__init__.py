"""Evaluation of generated music: FAD / FAD-inf (frechet), KLD (kld), musicnn in JAX (musicnn)."""
