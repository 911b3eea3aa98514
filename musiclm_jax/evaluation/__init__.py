"""Evaluation of generated music.

frechet (FAD, FAD-inf), kld (tag-posterior KL), musicnn (the MagnaTagATune tagger in JAX),
embedders (more FAD embedders: the MuLan audio tower, VGGish and TRILL SavedModels),
fad_baselines (real-vs-real, noise and silence floors), attributes (a corpus-attribute
classifier), report (metrics JSON, Markdown with plots and training curves, TensorBoard scalars), pipeline_eval
(`musiclm-jax eval --gin_file=runs/eval.gin`: a pipeline folder scored over a split).
"""
