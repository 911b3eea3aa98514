"""musiclm-jax: MusicLM (text-to-music) on JAX/Flax, with T5X-style gin trainers on device meshes."""
__version__ = '0.1.0'
