"""Evaluation of generated music.

frechet (FAD, FAD-inf), kld (tag-posterior KL), musicnn (the MagnaTagATune tagger in JAX),
fad_baselines (real-vs-real, noise and silence floors), attributes (a corpus-attribute
classifier), report (metrics JSON, Markdown with plots, TensorBoard scalars), pipeline_eval
(`musiclm-jax eval --gin_file=runs/eval.gin`: a pipeline folder scored over a split).
"""
