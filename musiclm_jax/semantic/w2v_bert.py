"""w2v-BERT (Chung et al., 2021): a conformer pre-trained with contrastive + masked-prediction losses.

The flow, per clip of 24 kHz audio:

  audio -> log-mel (100 Hz, LogMelFrontEnd) -> per-clip standardisation -> two 3x3 stride-2
  convolutions (4x subsampling) -> features z [frames at 25 Hz, embed]
  z -> Gumbel-softmax quantizer (one learned codebook) -> targets q and their ids (unmasked z)
  z with masked spans replaced by a learned mask vector -> contrastive module (conformer layers)
    -> context c; contrastive loss: c_t must pick q_t among distractors q_s drawn from other
    masked frames of the same clip (cosine similarity / temperature), plus the codebook
    diversity loss
  c -> masked-prediction module (conformer layers) -> logits over the codebook ids; cross
    entropy against the quantizer's ids at the masked frames
  loss = contrastive + diversity_weight * diversity + mlm_weight * masked prediction

Input rate: the original works on 16 kHz speech; this one takes the project's 24 kHz audio as
it is (no resampling) through a 10 ms log-mel front end, and the 4x subsampling gives the
paper's 25 Hz semantic frames: one frame per 960 samples, two codec frames (50 Hz) per semantic
frame. A clip of N samples gives N // 960 frames.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax import lax

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.nn.attention import DenseGeneral
from musiclm_jax.nn.transformer import LayerNorm
from musiclm_jax.semantic.conformer import ConformerConfig, ConformerStack

Array = jax.Array
SUBSAMPLING = 4
_NEG = -1e9


# ---------------------------------------------------------------------------
# Masking and the losses (pure functions: tested against numpy references)
# ---------------------------------------------------------------------------


def span_mask(rng: Array, batch: int, length: int, mask_prob: float, span: int) -> Array:
  """wav2vec 2.0 span masking: every frame starts a masked span of `span` frames w.p. `mask_prob`.

  Spans may overlap and are cut at the end of the clip; the expected masked fraction is
  1 - (1 - mask_prob) ** span (0.49 for wav2vec 2.0's 0.065 and 10). A clip that drew no start
  gets one span at a uniformly random start, so every clip has masked frames to learn from.

  Returns:
    bool [batch, length], true where a frame is masked.
  """
  if not 0.0 < mask_prob < 1.0:
    raise ValueError(f'mask_prob must be in (0, 1), got {mask_prob}')
  if not 1 <= span <= length:
    raise ValueError(f'span must be in 1..{length} (the clip length in frames), got {span}')
  start_rng, fallback_rng = jax.random.split(rng)
  starts = jax.random.bernoulli(start_rng, mask_prob, (batch, length))
  fallback = jax.random.randint(fallback_rng, (batch,), 0, length - span + 1)
  none = ~jnp.any(starts, axis=1)
  starts = starts | (none[:, None] & (jnp.arange(length)[None, :] == fallback[:, None]))
  # Frame t is masked when some start lies in (t - span, t].
  padded = jnp.pad(starts, ((0, 0), (span - 1, 0)))
  masked = functools.reduce(jnp.logical_or, [padded[:, j:j + length] for j in range(span)])
  return masked


def sample_negatives(rng: Array, mask: Array, num_negatives: int) -> tuple[Array, Array]:
  """For every frame, `num_negatives` other masked frames of the same clip, without replacement.

  Returns:
    (indices int32 [batch, length, K], valid bool [batch, length, K]); an index is invalid when
    the clip has fewer than K other masked frames.
  """
  batch, length = mask.shape
  noise = jax.random.gumbel(rng, (batch, length, length))
  other = mask[:, None, :] & ~jnp.eye(length, dtype=bool)[None]
  scores = jnp.where(other, noise, -jnp.inf)
  k = min(num_negatives, length)
  values, indices = lax.top_k(scores, k)
  return indices.astype(jnp.int32), jnp.isfinite(values)


def _cosine(a: Array, b: Array) -> Array:
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return jnp.sum(a * b, axis=-1)


def contrastive_loss(context: Array, targets: Array, mask: Array, negative_indices: Array,
                     negative_valid: Array, temperature: float,
                     target_ids: Optional[Array] = None) -> tuple[Array, Array, Array]:
  """wav2vec 2.0's contrastive loss over the masked frames.

  For a masked frame t: logits are cosine(c_t, q_t) and cosine(c_t, q_s) for its distractors s,
  divided by `temperature`; the loss is the cross entropy of picking q_t. A distractor with the
  target's own code is left out, as in wav2vec 2.0 (by code id when `target_ids` is given: two
  projections of one code vector need not be bitwise equal once XLA tiles the matmul
  differently, e.g. under another sharding; else by exact vector equality).

  Args:
    context: [batch, length, dim] context vectors (projected).
    targets: [batch, length, dim] quantized targets (projected).
    mask: bool [batch, length] masked frames (where the loss is taken).
    negative_indices / negative_valid: from `sample_negatives`.
    temperature: kappa (0.1 in wav2vec 2.0).
    target_ids: optional int [batch, length] codes of the targets.

  Returns:
    (sum of per-frame losses, number of frames the target won, number of masked frames).
  """
  context = context.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  positive = _cosine(context, targets)
  negatives = jax.vmap(lambda q, idx: q[idx])(targets, negative_indices)  # [B, T, K, D]
  negative = _cosine(context[:, :, None, :], negatives)
  if target_ids is None:
    same = jnp.all(negatives == targets[:, :, None, :], axis=-1)
  else:
    negative_ids = jax.vmap(lambda ids, idx: ids[idx])(target_ids, negative_indices)
    same = negative_ids == target_ids[:, :, None]
  negative = jnp.where(negative_valid & ~same, negative, _NEG * temperature)
  logits = jnp.concatenate([positive[..., None], negative], axis=-1) / temperature
  losses = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
  correct = jnp.argmax(logits, axis=-1) == 0
  weights = mask.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def diversity_loss(logits: Array, weights: Optional[Array] = None) -> tuple[Array, Array]:
  """wav2vec 2.0's codebook diversity loss: (V - perplexity of the average softmax) / V.

  Args:
    logits: [..., V] quantizer logits (without Gumbel noise).
    weights: optional [...] frame weights.

  Returns:
    (loss in [0, 1), perplexity in [1, V]).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  flat = probs.reshape(-1, probs.shape[-1])
  if weights is None:
    avg = jnp.mean(flat, axis=0)
  else:
    w = weights.reshape(-1).astype(jnp.float32)
    avg = jnp.sum(flat * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  perplexity = jnp.exp(-jnp.sum(avg * jnp.log(avg + 1e-7)))
  size = logits.shape[-1]
  return (size - perplexity) / size, perplexity


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class ConvFeatureEncoder(nn.Module):
  """Log-mel frames [batch, 4T', mels] -> features [batch, T', embed] (two 3x3 stride-2 convs)."""
  channels: int
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, mel: Array) -> Array:
    x = mel[..., None].astype(self.dtype)
    for i in range(2):
      x = nn.Conv(self.channels, (3, 3), strides=(2, 2), padding='SAME', dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'conv_{i}',
                  # The first convolution has one input channel: nothing to shard.
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.lecun_normal(),
                      ('conv_height', 'conv_width', 'conv_in' if i else None, 'conv_out')),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))(x)
      x = nn.gelu(x)
    batch, frames = x.shape[:2]
    x = x.reshape(batch, frames, -1)
    x = DenseGeneral(self.embed_dim, kernel_axes=('mlp', 'embed'), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='projection')(x)
    return LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x)


class GumbelQuantizer(nn.Module):
  """One learned codebook chosen by a straight-through Gumbel softmax (wav2vec 2.0, G = 1).

  Returns (quantized [.., codebook_dim], ids int32 [..], logits [.., codebook_size]); in training
  (`temperature` and a 'gumbel' rng given) the choice is a hard sample whose gradient is that
  of the soft sample; otherwise the arg-max code.
  """
  codebook_size: int
  codebook_dim: int
  logit_init_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temperature: Optional[Array] = None):
    logits = DenseGeneral(self.codebook_size, kernel_axes=('embed', 'codebook'),
                          init_scale=self.logit_init_scale, dtype=jnp.float32,
                          param_dtype=self.param_dtype, name='logits')(x).astype(jnp.float32)
    codebook = self.param('codebook', nn.with_logical_partitioning(
        nn.initializers.uniform(1.0), ('codebook', 'kv')),
                          (self.codebook_size, self.codebook_dim), self.param_dtype)
    if temperature is None:
      ids = jnp.argmax(logits, axis=-1)
      choice = jax.nn.one_hot(ids, self.codebook_size, dtype=jnp.float32)
    else:
      noise = jax.random.gumbel(self.make_rng('gumbel'), logits.shape)
      soft = jax.nn.softmax((logits + noise) / temperature, axis=-1)
      ids = jnp.argmax(soft, axis=-1)
      hard = jax.nn.one_hot(ids, self.codebook_size, dtype=jnp.float32)
      choice = hard + soft - lax.stop_gradient(soft)
    quantized = jnp.einsum('...v,vd->...d', choice, codebook.astype(jnp.float32))
    return quantized.astype(self.dtype), ids.astype(jnp.int32), logits


@gin.configurable
class W2VBert(nn.Module):
  """The w2v-BERT network: feature encoder, quantizer, contrastive and masked-prediction modules.

  Attributes:
    front_end: log-mel front end (its hop sets the rate: 240 at 24 kHz is 100 Hz -> 25 Hz frames).
    conv_channels: channels of the two subsampling convolutions.
    embed_dim, num_heads, head_dim, mlp_dim, conv_kernel_size, dropout_rate: conformer sizes.
    num_contrastive_layers: conformer blocks of the contrastive module.
    num_mlm_layers: conformer blocks of the masked-prediction module.
    codebook_size: quantizer codes (the masked-prediction vocabulary).
    codebook_dim: width of a code vector.
    projection_dim: width of the space where the contrastive similarities are taken.
    quantizer_logit_init_scale: variance scale of the quantizer's logit projection at init (1:
      wav2vec 2.0's near-uniform start, where the codes are noise until the quantizer learns;
      larger starts from sharper, BEST-RQ-like random-projection codes).
    remat_policy: conformer rematerialisation ('none', 'full', 'dots_saveable', ...).
    scan_layers: run each conformer module's blocks with `nn.scan` over stacked parameters
      (ConformerConfig.scan_layers: much faster compiles of deep models; a different parameter
      layout from the default per-layer one).
    dtype: compute dtype (e.g. bfloat16; parameters stay float32).
  """
  front_end: LogMelFrontEnd = LogMelFrontEnd()
  conv_channels: int = 32
  embed_dim: int = 1024
  num_heads: int = 8
  head_dim: int = 128
  mlp_dim: int = 4096
  conv_kernel_size: int = 5
  dropout_rate: float = 0.0
  num_contrastive_layers: int = 12
  num_mlm_layers: int = 12
  codebook_size: int = 1024
  codebook_dim: int = 256
  projection_dim: int = 256
  quantizer_logit_init_scale: float = 1.0
  remat_policy: str = 'none'
  scan_layers: bool = False
  dtype: Any = jnp.float32

  @property
  def hop_samples(self) -> int:
    """Input samples per output frame (960 at 24 kHz: 25 Hz)."""
    return self.front_end.hop_length * SUBSAMPLING

  @property
  def frame_rate(self) -> float:
    return self.front_end.sample_rate / self.hop_samples

  def num_frames(self, num_samples: int) -> int:
    """Output frames for a clip of `num_samples` samples."""
    return num_samples // self.hop_samples

  @property
  def num_layers(self) -> int:
    return self.num_contrastive_layers + self.num_mlm_layers

  def setup(self):
    cfg = ConformerConfig(
        embed_dim=self.embed_dim, num_heads=self.num_heads, head_dim=self.head_dim,
        mlp_dim=self.mlp_dim, conv_kernel_size=self.conv_kernel_size,
        dropout_rate=self.dropout_rate, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, dtype=self.dtype)
    self.feature_encoder = ConvFeatureEncoder(self.conv_channels, self.embed_dim,
                                              dtype=self.dtype)
    self.quantizer = GumbelQuantizer(self.codebook_size, self.codebook_dim,
                                     logit_init_scale=self.quantizer_logit_init_scale,
                                     dtype=self.dtype)
    self.mask_embedding = self.param(
        'mask_embedding', nn.with_logical_partitioning(nn.initializers.uniform(1.0), ('embed',)),
        (self.embed_dim,), jnp.float32)
    self.input_dropout = nn.Dropout(self.dropout_rate)
    self.contrastive = ConformerStack(cfg, self.num_contrastive_layers)
    self.mlm = ConformerStack(cfg, self.num_mlm_layers)
    dense = functools.partial(DenseGeneral, dtype=self.dtype)
    self.context_projection = dense(self.projection_dim, kernel_axes=('embed', 'kv'))
    self.target_projection = dense(self.projection_dim, kernel_axes=('embed', 'kv'))
    self.mlm_head = dense(self.codebook_size, kernel_axes=('embed', 'vocab'))

  def features(self, audio: Array) -> Array:
    """Feature-encoder output [batch, num_frames(samples), embed] of audio [batch, samples]."""
    audio = jnp.asarray(audio, jnp.float32)
    frames = self.num_frames(audio.shape[-1])
    if frames < 1:
      raise ValueError(f'{audio.shape[-1]} samples are fewer than one frame '
                       f'({self.hop_samples} samples)')
    mel = self.front_end(audio)
    # Per-clip standardisation: a gain change is a constant offset of the log-mel.
    mel = (mel - jnp.mean(mel, axis=(1, 2), keepdims=True)) / (
        jnp.std(mel, axis=(1, 2), keepdims=True) + 1e-5)
    mel = mel[:, :frames * SUBSAMPLING]
    return self.feature_encoder(mel)[:, :frames]

  def __call__(self, audio: Array, mask: Array, *, temperature: Optional[Array] = None,
               deterministic: bool = True) -> dict[str, Array]:
    """The pre-training forward pass.

    Args:
      audio: float32 [batch, samples].
      mask: bool [batch, num_frames(samples)], the frames to mask.
      temperature: Gumbel-softmax temperature (training; needs a 'gumbel' rng); None picks the
        arg-max codes.
      deterministic: disables dropout (else needs a 'dropout' rng).

    Returns:
      {'context': projected contrastive-module outputs, 'targets': projected quantized targets,
       'target_ids': the quantizer's codes, 'quantizer_logits', 'mlm_logits'}.
    """
    z = self.features(audio)
    quantized, ids, q_logits = self.quantizer(z, temperature)
    x = jnp.where(mask[..., None], self.mask_embedding.astype(z.dtype), z)
    x = self.input_dropout(x, deterministic=deterministic)
    context = self.contrastive(x, deterministic=deterministic)
    c = context[-1] if context else x
    mlm = self.mlm(c, deterministic=deterministic)
    m = mlm[-1] if mlm else c
    return {
        'context': self.context_projection(c),
        'targets': self.target_projection(quantized),
        'target_ids': ids,
        'quantizer_logits': q_logits,
        'mlm_logits': self.mlm_head(m).astype(jnp.float32),
    }

  def embed(self, audio: Array, layer: int) -> Array:
    """Unmasked embeddings [batch, frames, embed] after conformer layer `layer`.

    Layers are numbered 1..num_layers over the whole encoder, the contrastive module first
    (0 is the feature encoder's output): the paper's "layer 7 of the masked-prediction module"
    is num_contrastive_layers + 7.
    """
    if not 0 <= layer <= self.num_layers:
      raise ValueError(f'layer={layer} is outside 0..{self.num_layers} (0: feature encoder, '
                       f'1..{self.num_contrastive_layers}: contrastive module, then the '
                       'masked-prediction module)')
    x = self.features(audio)
    if layer == 0:
      return x
    n_c = min(layer, self.num_contrastive_layers)
    if n_c:
      x = self.contrastive(x, num_layers_to_run=n_c)[-1]
    if layer > self.num_contrastive_layers:
      x = self.mlm(x, num_layers_to_run=layer - self.num_contrastive_layers)[-1]
    return x
