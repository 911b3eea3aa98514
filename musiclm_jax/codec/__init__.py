"""SoundStream neural audio codec: SEANet encoder/decoder, residual VQ, training model."""

from musiclm_jax.codec.discriminators import CodecDiscriminators
from musiclm_jax.codec.model import CodecModel
from musiclm_jax.codec.model import load_codec
from musiclm_jax.codec.seanet import CausalConv1d
from musiclm_jax.codec.seanet import CausalConvTranspose1d
from musiclm_jax.codec.seanet import ResidualUnit
from musiclm_jax.codec.seanet import SEANetDecoder
from musiclm_jax.codec.seanet import SEANetEncoder
from musiclm_jax.codec.soundstream import decode_chunked
from musiclm_jax.codec.soundstream import encode_chunked
from musiclm_jax.codec.soundstream import SoundStream

__all__ = [
    'CausalConv1d',
    'CausalConvTranspose1d',
    'CodecDiscriminators',
    'CodecModel',
    'decode_chunked',
    'encode_chunked',
    'load_codec',
    'ResidualUnit',
    'SEANetDecoder',
    'SEANetEncoder',
    'SoundStream',
]
