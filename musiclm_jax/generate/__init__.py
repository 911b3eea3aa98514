"""Sampling from the stage language models: KV-cache decoding, guidance, token filters."""

from musiclm_jax.generate.decoding import decode
from musiclm_jax.generate.decoding import decode_chunks
from musiclm_jax.generate.decoding import decode_steps
from musiclm_jax.generate.decoding import DecodeState
from musiclm_jax.generate.decoding import start_decode
from musiclm_jax.generate.sampling import check_vocab_mask
from musiclm_jax.generate.sampling import filter_logits
from musiclm_jax.generate.sampling import level_vocab_mask
from musiclm_jax.generate.sampling import row_keys
from musiclm_jax.generate.sampling import sample

__all__ = [
    'check_vocab_mask',
    'decode',
    'decode_chunks',
    'decode_steps',
    'DecodeState',
    'filter_logits',
    'level_vocab_mask',
    'row_keys',
    'sample',
    'start_decode',
]
