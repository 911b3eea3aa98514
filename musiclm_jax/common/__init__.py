"""Helpers every layer may use: they import nothing else of musiclm_jax.

- `atomic`: atomic writes (a file is whole or absent, never half-written);
- `tf_setup`: TensorFlow imported quietly and kept off the accelerators.
"""
