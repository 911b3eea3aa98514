"""SoundStream neural audio codec: causal SEANet encoder, residual VQ, SEANet decoder."""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from musiclm_jax.codec.fourier import FourierDecoder
from musiclm_jax.codec.fourier import FourierEncoder
from musiclm_jax.codec.seanet import SEANetDecoder
from musiclm_jax.codec.seanet import SEANetEncoder
from musiclm_jax.nn.quantizer import ResidualVectorQuantizer
from musiclm_jax.nn.quantizer import UNUSED_CODE

Array = jax.Array
Dtype = Any


@gin.configurable
class SoundStream(nn.Module):
  """SoundStream (Zeghidour et al., 2021) as used by MusicLM.

  audio [batch, samples] -> causal SEANet encoder -> [batch, frames, D] ->
  residual VQ (num_levels codebooks of codebook_size codes, EMA-learned) ->
  causal SEANet decoder -> audio. With the defaults (24 kHz, strides
  2 * 4 * 6 * 10 = 480) there are 50 frames per second and 12 levels of 1024
  codes make 6 kbps; MusicLM calls levels 1-4 "coarse" and 5-12 "fine".

  With `quantizer_dropout`, training uses a random number of levels
  (1..num_levels) per example, so one model serves every bitrate from
  0.5 to 6 kbps: encode with `n_levels` and decode any prefix of the levels.

  Audio whose length is not a multiple of the hop is zero-padded to whole hops
  before encoding (frames = ceil(samples / hop)); `__call__` trims the
  reconstruction back to the input length.

  Variables: 'params' (encoder, decoder) and the non-trainable
  'quantizer_state' collection (codebooks and EMA statistics). Training calls
  need `mutable=['quantizer_state']` and a 'quantizer' rng; `init` needs a
  'params' rng only.

  Attributes:
    channels: SEANet width at the waveform end.
    channel_mults: widths after each down-sampling, as multiples of channels.
    strides: down-sampling factors; their product is the hop length.
    embedding_dim: dimension D of the quantized latent.
    kernel_size: taps of the SEANet input / output convolutions.
    residual_kernel_size: taps of the dilated residual convolutions.
    tanh_output: squash the decoder output into (-1, 1).
    activation: 'elu' (SoundStream) or 'snake' (DAC's periodic activation, one learned
      frequency per channel) in the encoder and the SEANet decoder.
    encoder_type: 'seanet' (SoundStream's strided convolutions) or 'fourier' (causal STFT
      features into ConvNeXt blocks at the frame rate; codec/fourier.py).
    decoder_type: 'seanet' (SoundStream's mirror of the encoder) or 'fourier' (a causal
      Vocos-style decoder: ConvNeXt blocks at the frame rate predict STFT frames, an inverse FFT
      makes the waveform; codec/fourier.py).
    fourier_dim: width of the Fourier encoder's and decoder's blocks.
    fourier_layers: ConvNeXt blocks of the Fourier encoder and of the Fourier decoder.
    fourier_stft_hop: their STFT hop (divides the hop length; window 4x).
    num_levels: residual VQ levels N.
    codebook_size: codes per level K.
    commitment_cost: weight of the commitment loss.
    ema_decay: EMA decay of the codebooks.
    kmeans_init: initialise codebooks by k-means on the first training batch.
    kmeans_iters: Lloyd iterations of that k-means.
    dead_code_threshold: EMA cluster size under which a code is restarted.
    quantizer_dropout: sample 1..N levels per example in training.
    quantizer_dropout_prob: the fraction of examples that sample; the rest use all N levels.
    sample_rate: audio sample rate in Hz (informational: frame_rate, bitrate).
    dtype: compute dtype of the convolutions (quantization is float32).
    param_dtype: parameter dtype.
  """
  channels: int = 32
  channel_mults: Sequence[int] = (2, 4, 8, 16)
  strides: Sequence[int] = (2, 4, 6, 10)
  embedding_dim: int = 128
  kernel_size: int = 7
  residual_kernel_size: int = 7
  tanh_output: bool = False
  activation: str = 'elu'
  encoder_type: str = 'seanet'
  decoder_type: str = 'seanet'
  fourier_dim: int = 256
  fourier_layers: int = 8
  fourier_stft_hop: int = 240
  num_levels: int = 12
  codebook_size: int = 1024
  commitment_cost: float = 0.25
  ema_decay: float = 0.99
  kmeans_init: bool = True
  kmeans_iters: int = 10
  dead_code_threshold: float = 2.0
  quantizer_dropout: bool = True
  quantizer_dropout_prob: float = 1.0
  sample_rate: int = 24000
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    # Gin may hand over lists; tuples keep the module hashable, which the
    # chunked functions need (the model is a static jit argument).
    object.__setattr__(self, 'channel_mults', tuple(self.channel_mults))
    object.__setattr__(self, 'strides', tuple(self.strides))
    super().__post_init__()

  # ------------------------------------------------------------ structure
  def _fourier_fields(self) -> Dict[str, Any]:
    """The Fourier encoder's and decoder's settings (codec/fourier.py)."""
    return dict(hop_length=self.hop_length, embedding_dim=self.embedding_dim,
                dim=self.fourier_dim, num_layers=self.fourier_layers,
                kernel_size=self.kernel_size, stft_hop=self.fourier_stft_hop,
                dtype=self.dtype, param_dtype=self.param_dtype)

  def _encoder(self, **kwargs) -> nn.Module:
    if self.encoder_type == 'fourier':
      return FourierEncoder(**self._fourier_fields(), **kwargs)
    if self.encoder_type != 'seanet':
      raise ValueError(f"SoundStream.encoder_type must be 'seanet' or 'fourier', got "
                       f'{self.encoder_type!r}')
    return SEANetEncoder(
        channels=self.channels, channel_mults=tuple(self.channel_mults),
        strides=tuple(self.strides), embedding_dim=self.embedding_dim,
        kernel_size=self.kernel_size,
        residual_kernel_size=self.residual_kernel_size, activation=self.activation,
        dtype=self.dtype, param_dtype=self.param_dtype, **kwargs)

  def _decoder(self, **kwargs) -> nn.Module:
    if self.decoder_type == 'fourier':
      return FourierDecoder(**self._fourier_fields(), **kwargs)
    if self.decoder_type != 'seanet':
      raise ValueError(f"SoundStream.decoder_type must be 'seanet' or 'fourier', got "
                       f'{self.decoder_type!r}')
    return SEANetDecoder(
        channels=self.channels, channel_mults=tuple(self.channel_mults),
        strides=tuple(self.strides), embedding_dim=self.embedding_dim,
        kernel_size=self.kernel_size,
        residual_kernel_size=self.residual_kernel_size,
        tanh_output=self.tanh_output, activation=self.activation, dtype=self.dtype,
        param_dtype=self.param_dtype, **kwargs)

  def setup(self):
    self.encoder = self._encoder()
    self.quantizer = ResidualVectorQuantizer(
        num_levels=self.num_levels, codebook_size=self.codebook_size,
        dim=self.embedding_dim, commitment_cost=self.commitment_cost,
        ema_decay=self.ema_decay, kmeans_init=self.kmeans_init,
        kmeans_iters=self.kmeans_iters,
        dead_code_threshold=self.dead_code_threshold,
        quantizer_dropout=self.quantizer_dropout,
        quantizer_dropout_prob=self.quantizer_dropout_prob, dtype=jnp.float32,
        param_dtype=self.param_dtype)
    self.decoder = self._decoder()

  # ------------------------------------------------------------ rates
  @property
  def hop_length(self) -> int:
    """Audio samples per codec frame (480 by default)."""
    return math.prod(self.strides)

  @property
  def frame_rate(self) -> float:
    """Codec frames per second (50.0 by default)."""
    return self.sample_rate / self.hop_length

  def bitrate(self, n_levels: Optional[int] = None) -> float:
    """Bits per second of `n_levels` (default all) levels of codes."""
    n = self.num_levels if n_levels is None else n_levels
    return n * math.log2(self.codebook_size) * self.frame_rate

  # Detached (parent=None) copies of the encoder and decoder answer these on
  # unbound and bound modules alike, without registering submodules.
  @property
  def encoder_receptive_field(self) -> int:
    """Audio samples that one frame's codes depend on (ending with its hop)."""
    return self._encoder(parent=None).receptive_field

  @property
  def encoder_context_frames(self) -> int:
    """Whole frames of left context that make chunked encoding exact."""
    return self._encoder(parent=None).context_frames

  @property
  def decoder_context_frames(self) -> int:
    """Frames before frame t that the decoded hop of frame t depends on."""
    return self._decoder(parent=None).context_frames

  def num_frames(self, num_samples: int) -> int:
    """Frames of codes for `num_samples` samples: ceil(samples / hop)."""
    return -(-num_samples // self.hop_length)

  def _pad_to_hops(self, audio: Array) -> Array:
    if audio.ndim != 2:
      raise ValueError(f'expected audio [batch, samples], got {audio.shape}')
    if audio.shape[-1] < 1:
      raise ValueError('audio has no samples')
    extra = self.num_frames(audio.shape[-1]) * self.hop_length - audio.shape[-1]
    audio = audio.astype(jnp.float32)
    return jnp.pad(audio, ((0, 0), (0, extra))) if extra else audio

  # ------------------------------------------------------------ API
  def __call__(self, audio: Array, *, train: bool,
               n_levels: Optional[int] = None) -> Dict[str, Array]:
    """Encodes, quantizes and decodes audio.

    Args:
      audio: [batch, samples] float audio.
      train: update the codebooks and apply quantizer dropout (needs
        `mutable=['quantizer_state']` and a 'quantizer' rng).
      n_levels: static number of levels to use (default all); with
        quantizer dropout in training, the per-example count is drawn from
        1..n_levels.

    Returns:
      A dict with
        audio: [batch, samples] float32 reconstruction.
        codes: [batch, frames, num_levels] int32; -1 marks levels not used
          for an example (beyond n_levels or dropped).
        commitment_loss: scalar (gradient reaches the encoder only).
        usage: [num_levels] fraction of each level's codes used in the batch.
        perplexity: [num_levels] code perplexity of each level.
        num_active_levels: [batch] levels used per example.
    """
    samples = audio.shape[-1]
    latent = self.encoder(self._pad_to_hops(audio))
    q = self.quantizer(latent, train=train, n_levels=n_levels)
    recon = self.decoder(q['quantized'])[:, :samples]
    return dict(audio=recon, codes=q['codes'],
                commitment_loss=q['commitment_loss'], usage=q['usage'],
                perplexity=q['perplexity'],
                num_active_levels=q['num_active_levels'])

  def encode(self, audio: Array, n_levels: Optional[int] = None) -> Array:
    """Codes int32 [batch, frames, n_levels or num_levels] of [batch, samples].

    Args:
      audio: [batch, samples] float audio (padded to whole hops).
      n_levels: static number of levels to return (default all); the result
        has exactly that many columns, coarsest first.
    """
    levels = self.num_levels if n_levels is None else n_levels
    latent = self.encoder(self._pad_to_hops(audio))
    return self.quantizer.encode(latent, levels)[..., :levels]

  def decode(self, codes: Array) -> Array:
    """Audio float32 [batch, frames * hop] of codes [batch, frames, n].

    Args:
      codes: int codes of the first n <= num_levels levels (a coarse prefix
        decodes at a lower bitrate); -1 entries contribute nothing.
    """
    if codes.ndim != 3:
      raise ValueError(f'expected codes [batch, frames, levels], got '
                       f'{codes.shape}')
    return self.decoder(self.quantizer.decode(codes))


# ------------------------------------------------------------ long inputs
# The model is a static argument (Flax modules hash by their fields), so every
# chunk of every call with the same model and chunk size shares one compile.
@functools.partial(jax.jit, static_argnames=('model', 'n_levels', 'frames'))
def _encode_window(model: SoundStream, variables: Any, window: Array,
                   offset: Array, *, n_levels: Optional[int],
                   frames: int) -> Array:
  codes = model.apply(variables, window, n_levels=n_levels,
                      method=SoundStream.encode)
  return lax.dynamic_slice_in_dim(codes, offset, frames, axis=1)


@functools.partial(jax.jit, static_argnames=('model', 'frames'))
def _decode_window(model: SoundStream, variables: Any, window: Array,
                   offset: Array, *, frames: int) -> Array:
  audio = model.apply(variables, window, method=SoundStream.decode)
  hop = model.hop_length
  return lax.dynamic_slice_in_dim(audio, offset * hop, frames * hop, axis=1)


def _windows(total: int, chunk: int, context: int
             ) -> tuple[list[tuple[int, int]], int]:
  """Plans the windows of a chunked pass over `total` frames.

  Chunk i keeps frames [i * chunk, (i + 1) * chunk). Its window of
  `context + chunk` frames starts `context` frames earlier, or at 0 near the
  beginning: there the whole-input computation sees the same zero padding at
  every layer as the window does, so starting at 0 is exact too.

  Returns:
    ([(window start, offset of the kept chunk in the window)] per chunk, the
    padded length that every window fits in), all in frames.
  """
  num_chunks = max(1, -(-total // chunk))
  padded = max(num_chunks * chunk, context + chunk)
  starts = []
  for i in range(num_chunks):
    start = max(0, i * chunk - context)
    starts.append((start, i * chunk - start))
  return starts, padded


def encode_chunked(model: SoundStream, variables: Any, audio: Any,
                   chunk_seconds: float = 10.0,
                   n_levels: Optional[int] = None) -> Array:
  """Encodes long audio chunk by chunk, equal to `model.encode` of the whole.

  Every chunk is encoded with `model.encoder_context_frames` frames of left
  context (at least the encoder's receptive field), so, the encoder being
  causal, its codes are those of the whole input; all windows have one size
  (the last is zero-padded), hence one compile. Memory is bounded by the
  window, not by the input.

  Args:
    model: the SoundStream.
    variables: its variables ('params' and 'quantizer_state').
    audio: [batch, samples] float audio (numpy or jax; read on the host).
    chunk_seconds: audio encoded per call, rounded to whole frames.
    n_levels: levels to return (default all).

  Returns:
    int32 codes [batch, ceil(samples / hop), n_levels or num_levels].
  """
  audio = np.asarray(audio, np.float32)
  if audio.ndim != 2 or audio.shape[-1] < 1:
    raise ValueError(f'expected audio [batch, samples], got {audio.shape}')
  hop = model.hop_length
  chunk = max(1, int(round(chunk_seconds * model.frame_rate)))
  total = model.num_frames(audio.shape[-1])
  context = model.encoder_context_frames
  starts, padded = _windows(total, chunk, context)
  audio = np.pad(audio, ((0, 0), (0, padded * hop - audio.shape[-1])))
  width = (context + chunk) * hop
  pieces = [
      _encode_window(model, variables,
                     audio[:, start * hop:start * hop + width],
                     jnp.int32(offset), n_levels=n_levels, frames=chunk)
      for start, offset in starts]
  codes = np.concatenate([np.asarray(p) for p in pieces], axis=1)
  return jnp.asarray(codes[:, :total])


def decode_chunked(model: SoundStream, variables: Any, codes: Any,
                   chunk_frames: int = 500) -> Array:
  """Decodes long code sequences chunk by chunk, equal to `model.decode`.

  Every chunk is decoded with `model.decoder_context_frames` frames of left
  context (the decoder is causal, so there are no seams); all windows have
  one size (the last is padded with unused codes), hence one compile.

  Args:
    model: the SoundStream.
    variables: its variables ('params' and 'quantizer_state').
    codes: int [batch, frames, n <= num_levels] codes (read on the host).
    chunk_frames: frames decoded per call (500 = 10 s at 50 Hz).

  Returns:
    float32 audio [batch, frames * hop].
  """
  codes = np.asarray(codes, np.int32)
  if codes.ndim != 3:
    raise ValueError(f'expected codes [batch, frames, levels], got '
                     f'{codes.shape}')
  hop = model.hop_length
  chunk = max(1, int(chunk_frames))
  total = codes.shape[1]
  context = model.decoder_context_frames
  starts, padded = _windows(total, chunk, context)
  codes = np.pad(codes, ((0, 0), (0, padded - total), (0, 0)),
                 constant_values=UNUSED_CODE)
  width = context + chunk
  pieces = [
      _decode_window(model, variables, codes[:, start:start + width],
                     jnp.int32(offset), frames=chunk)
      for start, offset in starts]
  audio = np.concatenate([np.asarray(p) for p in pieces], axis=1)
  return jnp.asarray(audio[:, :total * hop])
