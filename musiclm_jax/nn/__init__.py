"""Shared neural-network layers: attention, decoder-only Transformer, RVQ."""

from musiclm_jax.nn.attention import causal_blockwise_attention
from musiclm_jax.nn.attention import combine_masks
from musiclm_jax.nn.attention import DenseGeneral
from musiclm_jax.nn.attention import dot_product_attention
from musiclm_jax.nn.attention import make_attention_mask
from musiclm_jax.nn.attention import make_causal_mask
from musiclm_jax.nn.attention import make_padding_mask
from musiclm_jax.nn.attention import make_segment_mask
from musiclm_jax.nn.attention import MultiHeadAttention
from musiclm_jax.nn.attention import relative_position_bucket
from musiclm_jax.nn.attention import RelativePositionBiases
from musiclm_jax.nn.quantizer import kmeans
from musiclm_jax.nn.quantizer import ResidualVectorQuantizer
from musiclm_jax.nn.quantizer import RNG_STREAM as QUANTIZER_RNG_STREAM
from musiclm_jax.nn.quantizer import STATE_COLLECTION as QUANTIZER_STATE
from musiclm_jax.nn.quantizer import UNUSED_CODE
from musiclm_jax.nn.transformer import count_params
from musiclm_jax.nn.transformer import Decoder
from musiclm_jax.nn.transformer import DecoderLayer
from musiclm_jax.nn.transformer import Embed
from musiclm_jax.nn.transformer import init_decoder_cache
from musiclm_jax.nn.transformer import LayerNorm
from musiclm_jax.nn.transformer import MlpBlock
from musiclm_jax.nn.transformer import REMAT_POLICIES
from musiclm_jax.nn.transformer import TransformerConfig

__all__ = [
    'causal_blockwise_attention',
    'combine_masks',
    'count_params',
    'Decoder',
    'DecoderLayer',
    'DenseGeneral',
    'dot_product_attention',
    'Embed',
    'init_decoder_cache',
    'kmeans',
    'LayerNorm',
    'make_attention_mask',
    'make_causal_mask',
    'make_padding_mask',
    'make_segment_mask',
    'MlpBlock',
    'MultiHeadAttention',
    'QUANTIZER_RNG_STREAM',
    'QUANTIZER_STATE',
    'relative_position_bucket',
    'RelativePositionBiases',
    'REMAT_POLICIES',
    'ResidualVectorQuantizer',
    'TransformerConfig',
    'UNUSED_CODE',
]
