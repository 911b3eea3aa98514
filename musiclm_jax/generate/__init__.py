"""Sampling: KV-cache decoding of the stage LMs, and the text-to-music pipeline (`Pipeline`)."""

from musiclm_jax.generate.decoding import decode
from musiclm_jax.generate.decoding import decode_chunks
from musiclm_jax.generate.decoding import decode_steps
from musiclm_jax.generate.decoding import DecodeState
from musiclm_jax.generate.decoding import start_decode
from musiclm_jax.generate.pipeline import assemble_pipeline
from musiclm_jax.generate.pipeline import Generation
from musiclm_jax.generate.pipeline import load_pipeline
from musiclm_jax.generate.pipeline import Pipeline
from musiclm_jax.generate.sampling import check_vocab_mask
from musiclm_jax.generate.sampling import filter_logits
from musiclm_jax.generate.sampling import level_vocab_mask
from musiclm_jax.generate.sampling import row_keys
from musiclm_jax.generate.sampling import sample

__all__ = [
    'assemble_pipeline',
    'check_vocab_mask',
    'decode',
    'decode_chunks',
    'decode_steps',
    'DecodeState',
    'filter_logits',
    'Generation',
    'level_vocab_mask',
    'load_pipeline',
    'Pipeline',
    'row_keys',
    'sample',
    'start_decode',
]
