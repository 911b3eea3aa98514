"""The stage LM: a decoder-only Transformer over a stage spec's token layout, with conditioning dropout."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from musiclm_jax.nn import transformer
from musiclm_jax.stages.spec import StageSpec
from musiclm_jax.train.models import DecoderOnlyLM, cross_entropy_with_integer_labels
from musiclm_jax.train.optimizers import OptimizerConfig

logger = logging.getLogger(__name__)
Array = jax.Array


def round_up(n: int, multiple: int) -> int:
  multiple = max(1, int(multiple))
  return -(-int(n) // multiple) * multiple


@gin.configurable
class StageModel(DecoderOnlyLM):
  """One MusicLM stage: a decoder-only LM (T5 relative position bias) on a `StageSpec`'s layout.

  Batches are SeqIO PrefixLM batches (DatasetConfig.feature_converter = 'prefix_lm'; the stage
  tasks of musiclm_jax/stages/data.py give 'inputs' = the conditioning prefix and 'targets' =
  the predicted stream): `decoder_input_tokens`, `decoder_target_tokens`,
  `decoder_loss_weights`, and, packed, `decoder_segment_ids` / `decoder_positions` (other
  features, such as `decoder_causal_attention`, are ignored: attention is causal throughout).

  Loss: token cross entropy on the predicted stream only: `decoder_loss_weights` times "the
  target id lies in the predicted stream's range", so a batch whose weights also cover the
  prefix (e.g. the plain 'lm' converter) still trains only on the predicted part. With
  `level_softmax` (the default) each predicted position's softmax runs over the ids of its own
  RVQ level only (the level of its target id: `StageSpec.target_levels`), exactly the
  distribution the sampler draws from (`StageSpec.vocab_mask`); the model then never spends
  training on which id range a level uses, and loss, accuracy and the per-level metrics are
  those of the sampled distribution (a uniform guess scores log(codebook_size)).

  The level head (`level_softmax`, the default): training and evaluation read out only the
  columns a position's softmax runs over. Each row's positions are grouped by their target's
  level (a stable sort, so any layout, packed rows included, is grouped right) and each group is
  multiplied by its level's `codebook_size` columns of the read-out, so the head costs
  `codebook_size` columns a position instead of the whole vocabulary (coarse: 1,024 of 5,120;
  fine: 1,024 of 12,416), and the prefix positions, which carry no loss, none at all. The
  result equals the masked whole-vocabulary softmax (`restrict_logits`, kept as the reference);
  the sampler reads out only the step's level too (musiclm_jax/generate/decoding.py, for a
  vocab mask whose rows are runs of ids), the same distribution.

  Conditioning dropout (training only, for classifier-free guidance): each example (each packed
  segment) drops each droppable conditioning stream (MuLan, melody) independently with
  probability `conditioning_dropout`; every token of a dropped stream, in the decoder inputs and
  targets alike, becomes that stream's NULL id (`StageSpec.drop_streams`), so the model also
  learns p(target | no conditioning). Predicted tokens are never touched. The draws come from
  the step's rng inside the jitted step, so they are the same on any mesh.

  Window-start weighting (training only): with `start_weight` A > 0, the loss weight of a
  predicted token in frame f of its example's predicted stream (f counted from 0 in each packed
  segment) is multiplied by 1 + A exp(-f / `start_decay`). A window's first frames have no
  acoustic context, so they are the only tokens whose distribution the conditioning (MuLan) sets
  rather than the frames before them, and at generation the first frames of a clip fix the
  timbre that later windows continue; unweighted, their first 5 are 2-5% of a window's loss. The
  training 'loss' and 'accuracy' are then weighted means; evaluation stays unweighted.

  Evaluation metrics ({name: (sum, weight)}): 'loss', 'accuracy' over every predicted token;
  'loss/level_N', 'accuracy/level_N' per predicted RVQ level, N counted as the feature counts its
  levels from 1 (coarse: 1-4, fine: 5-12; the semantic stage has level_1 only); and, when the
  spec has droppable streams and `eval_unconditional`, 'loss_unconditional' and
  'accuracy_unconditional' with every droppable stream dropped (the gap to 'loss' measures how
  much the model uses its conditioning); and 'loss/window_start' (with 'loss_unconditional/
  window_start'): the loss over the first `start_frames` frames of each example's predicted
  stream, where the conditioning has the most to say.

  Args:
    spec: the stage's token layout.
    config: the Transformer's sizes. `vocab_size = 0` takes the spec's vocabulary rounded up to
      `vocab_multiple`; a positive value must be at least the spec's `vocab_size`.
    optimizer: the optimizer of the one parameter group 'model'.
    z_loss: PaLM's z-loss weight (training).
    conditioning_dropout: p, the per-example, per-stream probability of dropping a droppable
      conditioning stream in training.
    vocab_multiple: round the vocabulary up to a multiple of this (TPU-friendly table shapes and
      an even split over the 'model' mesh axis); ids past the spec's are never targets.
    eval_unconditional: also evaluate with the droppable streams dropped.
    level_softmax: restrict each predicted position's softmax to its level's ids (training and
      evaluation); False: the softmax over the whole vocabulary.
    start_weight: A, the extra training weight of a window's first frames (0: none).
    start_decay: its decay, in frames (> 0).
    start_frames: frames counted by the 'loss/window_start' metrics (0: no such metrics).
  """

  def __init__(self, spec: StageSpec = gin.REQUIRED,
               config: transformer.TransformerConfig = gin.REQUIRED,
               optimizer: OptimizerConfig = OptimizerConfig(), z_loss: float = 0.0,
               conditioning_dropout: float = 0.0, vocab_multiple: int = 128,
               eval_unconditional: bool = True, level_softmax: bool = True,
               start_weight: float = 0.0, start_decay: float = 4.0, start_frames: int = 5):
    if not 0.0 <= conditioning_dropout <= 1.0:
      raise ValueError(f'StageModel.conditioning_dropout={conditioning_dropout}: a probability '
                       'in [0, 1]')
    if conditioning_dropout > 0 and not spec.droppable:
      logger.warning('StageModel: stage %r has no droppable conditioning stream; '
                     'conditioning_dropout=%g does nothing', spec.name, conditioning_dropout)
    if config.vocab_size == 0:
      config = dataclasses.replace(config, vocab_size=round_up(spec.vocab_size, vocab_multiple))
    elif config.vocab_size < spec.vocab_size:
      raise ValueError(f'TransformerConfig.vocab_size={config.vocab_size} is smaller than stage '
                       f'{spec.name!r} needs ({spec.vocab_size} ids); set it to 0 to take the '
                       "spec's\n" + spec.describe())
    super().__init__(config, optimizer, z_loss)
    self.spec = spec
    self.conditioning_dropout = float(conditioning_dropout)
    self.eval_unconditional = bool(eval_unconditional)
    self.level_softmax = bool(level_softmax)
    if not (math.isfinite(start_weight) and start_weight >= 0.0):
      raise ValueError(f'StageModel.start_weight={start_weight}: a finite weight >= 0')
    if not (math.isfinite(start_decay) and start_decay > 0.0):
      raise ValueError(f'StageModel.start_decay={start_decay}: a finite number of frames > 0')
    if int(start_frames) < 0:
      raise ValueError(f'StageModel.start_frames={start_frames}: a number of frames >= 0')
    self.start_weight = float(start_weight)
    self.start_decay = float(start_decay)
    self.start_frames = int(start_frames)

  # ------------------------------------------------------------------------------ sizes
  def num_params(self, length: int = 8) -> int:
    """Parameters of the Transformer (from shapes only: nothing is computed or allocated)."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    shapes = jax.eval_shape(lambda t: self.module.init(jax.random.PRNGKey(0), t), tokens)
    return transformer.count_params(shapes['params'])

  # ------------------------------------------------------------------------------ batches
  def loss_weights(self, batch: Mapping[str, Array]) -> Array:
    """float32 [B, L]: the batch's loss weights, restricted to predicted-stream targets."""
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    predicted = self.spec.target_levels(targets) >= 0
    return weights.astype(jnp.float32) * predicted.astype(jnp.float32)

  def predicted_frames(self, batch: Mapping[str, Array]) -> Array:
    """int32 [B, L]: each predicted position's frame in its example's predicted stream (from 0,
    restarting at every packed segment); -1 where the target is not predicted."""
    predicted = self.spec.target_levels(batch['decoder_target_tokens']) >= 0
    count = jnp.cumsum(predicted.astype(jnp.int32), axis=1)  # predicted positions up to here
    segments = self._segment_ids(batch)
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                              segments[:, 1:] != segments[:, :-1]], axis=1)
    # The count before each segment's first position, carried forward (count never decreases).
    before = jax.lax.cummax(jnp.where(starts, count - predicted.astype(jnp.int32), 0), axis=1)
    index = count - before - 1
    return jnp.where(predicted, index // self.spec.period, -1)

  def start_weights(self, batch: Mapping[str, Array], weights: Array) -> Array:
    """`weights` times 1 + start_weight exp(-frame / start_decay) on predicted positions."""
    if self.start_weight <= 0.0:
      return weights
    frames = self.predicted_frames(batch).astype(jnp.float32)
    boost = 1.0 + self.start_weight * jnp.exp(-jnp.maximum(frames, 0.0) / self.start_decay)
    return weights * boost

  def restrict_logits(self, logits: Array, targets: Array) -> Array:
    """With `level_softmax`: logits [B, L, V] with every id outside each predicted position's
    level set to a large negative value (positions whose target is not predicted keep theirs)."""
    if not self.level_softmax:
      return logits
    levels = self.spec.target_levels(targets)  # [B, L]; -1 outside the predicted stream
    level_ids = jnp.asarray(self.spec.vocab_mask(logits.shape[-1]))  # the sampler's mask
    keep = jnp.take(level_ids, jnp.maximum(levels, 0), axis=0) | (levels < 0)[..., None]
    return jnp.where(keep, logits, jnp.asarray(-1e9, logits.dtype))

  def features(self, params, batch, *, rng: Optional[Array] = None) -> Array:
    """The Transformer's final features [B, L, embed] (dropout on when `rng` is given)."""
    return self.module.apply(
        {'params': params['model']}, batch['decoder_input_tokens'],
        segment_ids=self._segment_ids(batch), deterministic=rng is None,
        rngs=None if rng is None else {'dropout': rng}, features_only=True)

  def level_readout(self, params) -> Array:
    """[levels, embed, codebook_size]: each predicted level's columns of the read-out."""
    size = self.spec.target.codebook_size
    p = meta.unbox(params['model'])  # apply() unboxes too: init's params may be boxed
    return jnp.stack([transformer.readout_columns(self.config, p, int(o), size)
                      for o in self.spec.level_offsets(self.spec.target.name)])

  def _level_order(self, targets: Array) -> Array:
    """int32 [B, levels * T]: the level head's order of a row's positions (level_logits)."""
    levels = self.spec.target_levels(targets)  # [B, L], -1 outside the predicted stream
    slots = -(-targets.shape[1] // self.spec.period)
    # Each level's positions first, in order (stable sort on "is not level k"); a level of a
    # frame-major stream of whole frames holds at most ceil(L / levels) positions of a row,
    # packed or not (a position past that bound would get no loss).
    order = jnp.stack([jnp.argsort((levels != k).astype(jnp.int32), axis=1, stable=True)
                       [:, :slots] for k in range(self.spec.period)], axis=1)  # [B, K, T]
    return order.reshape(targets.shape[0], -1)

  def level_layout(self, batch: Mapping[str, Array], values: Array) -> Array:
    """[B, L] per-position values -> [B, levels, T] in the level head's layout."""
    targets = batch['decoder_target_tokens']
    flat = self._level_order(targets)
    return jnp.take_along_axis(values, flat, axis=1).reshape(
        targets.shape[0], self.spec.period, -1)

  def level_logits(self, params, batch, weights: Array, *,
                   rng: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """The level head: (logits [B, levels, T, codebook_size] float32, codes [B, levels, T],
    weights [B, levels, T]), T = ceil(L / levels): row b's positions of level k, in order, read
    out over level k's ids only (see the class docstring). Slots past a row's count of level-k
    positions, and positions whose target is not predicted, have weight 0.

    Args:
      params: the parameters.
      batch: a PrefixLM batch.
      weights: float [B, L] loss weights (`loss_weights`).
      rng: dropout key (training).
    """
    x = self.features(params, batch, rng=rng)  # [B, L, D]
    targets = batch['decoder_target_tokens']
    b, period = targets.shape[0], self.spec.period
    flat = self._level_order(targets)
    slots = flat.shape[1] // period
    xs = jnp.take_along_axis(x, flat[..., None], axis=1).reshape(b, period, slots, -1)
    take = lambda a: jnp.take_along_axis(a, flat, axis=1).reshape(b, period, slots)
    levels = self.spec.target_levels(targets)  # [B, L], -1 outside the predicted stream
    in_level = take(levels) == jnp.arange(period, dtype=jnp.int32)[None, :, None]
    w = take(weights) * in_level.astype(jnp.float32)
    offsets = jnp.asarray(self.spec.level_offsets(self.spec.target.name))[None, :, None]
    size = self.spec.target.codebook_size
    codes = jnp.clip(take(targets) - offsets, 0, size - 1)
    logits = jnp.einsum('bktd,kdc->bktc', xs, self.level_readout(params))
    return logits.astype(jnp.float32), codes, w

  def drop_conditioning(self, batch: Mapping[str, Array], rng: Array,
                        rate: Optional[float] = None) -> tuple[dict[str, Array], dict[str, Array]]:
    """Conditioning dropout: (the batch with dropped streams set to NULL, their drop rates).

    Args:
      batch: a PrefixLM batch (see the class docstring).
      rng: the draws' key.
      rate: drop probability (default `conditioning_dropout`).

    Returns:
      (batch with `decoder_input_tokens` and `decoder_target_tokens` changed, {'dropped/NAME':
      fraction of stream NAME's tokens in the batch that were replaced}).
    """
    rate = self.conditioning_dropout if rate is None else float(rate)
    droppable = self.spec.droppable
    batch = dict(batch)
    if not droppable or rate <= 0.0:
      return batch, {}
    segments = self._segment_ids(batch).astype(jnp.int32)  # 0 = padding, k = k-th example
    b, length = segments.shape
    # One draw per (row, segment id, stream): a packed row's examples drop independently, and
    # every token of one example's stream gets the same decision.
    draws = jax.random.bernoulli(rng, rate, (b, length + 1, len(droppable)))
    per_token = jnp.take_along_axis(draws, segments[..., None], axis=1)  # [B, L, streams]
    drop = {s.name: per_token[..., i] for i, s in enumerate(droppable)}
    inputs, targets = batch['decoder_input_tokens'], batch['decoder_target_tokens']
    metrics = {}
    for s in droppable:
      tokens_of_stream = self.spec.in_stream(s.name, targets)
      metrics[f'dropped/{s.name}'] = (
          jnp.sum(tokens_of_stream & drop[s.name]) / jnp.maximum(jnp.sum(tokens_of_stream), 1))
    batch['decoder_input_tokens'] = self.spec.drop_streams(inputs, drop)
    batch['decoder_target_tokens'] = self.spec.drop_streams(targets, drop)
    return batch, metrics

  def unconditional(self, batch: Mapping[str, Array]) -> dict[str, Array]:
    """The batch with every droppable stream replaced by its NULL id (guidance's other half)."""
    batch = dict(batch)
    for key in ('decoder_input_tokens', 'decoder_target_tokens'):
      batch[key] = self.spec.null_prompt(batch[key])
    return batch

  # ------------------------------------------------------------------------------ steps
  def compute_losses(self, params, model_state, batch, rng):
    drop_rng, dropout_rng = jax.random.split(rng)
    batch, metrics = self.drop_conditioning(batch, drop_rng)
    targets = batch['decoder_target_tokens']
    weights = self.start_weights(batch, self.loss_weights(batch))
    if self.level_softmax:
      logits, targets, weights = self.level_logits(params, batch, weights, rng=dropout_rng)
    else:
      logits = self.logits(params, batch, rng=dropout_rng)
    loss_sum, correct, weight = cross_entropy_with_integer_labels(
        logits, targets, weights, self.z_loss)
    denom = jnp.maximum(weight, 1.0)
    loss = loss_sum / denom
    metrics.update(loss=loss, accuracy=correct / denom)
    return {'model': loss}, metrics, model_state

  def _eval_logits(self, params, batch):
    """(logits, targets, weights, level and frame of each target position) for the evaluation
    metrics."""
    weights = self.loss_weights(batch)
    frames = self.predicted_frames(batch)
    if self.level_softmax:
      logits, codes, w = self.level_logits(params, batch, weights)
      levels = jnp.broadcast_to(jnp.arange(self.spec.period)[None, :, None], codes.shape)
      return logits, codes, w, levels, self.level_layout(batch, frames)
    targets = batch['decoder_target_tokens']
    return (self.logits(params, batch), targets, weights, self.spec.target_levels(targets),
            frames)

  def eval_metrics(self, params, model_state, batch):
    logits, targets, weights, levels, frames = self._eval_logits(params, batch)
    loss_sum, correct, weight = cross_entropy_with_integer_labels(logits, targets, weights)
    out = {'loss': (loss_sum, weight), 'accuracy': (correct, weight)}
    start = ((frames >= 0) & (frames < self.start_frames)).astype(jnp.float32)
    if self.start_frames:
      s_sum, _, s_weight = cross_entropy_with_integer_labels(logits, targets, weights * start)
      out['loss/window_start'] = (s_sum, s_weight)
    for level in range(self.spec.period):
      w = weights * (levels == level).astype(jnp.float32)
      l_sum, l_correct, l_weight = cross_entropy_with_integer_labels(logits, targets, w)
      number = self.spec.target.first_level + level + 1
      out[f'loss/level_{number}'] = (l_sum, l_weight)
      out[f'accuracy/level_{number}'] = (l_correct, l_weight)
    if self.eval_unconditional and self.spec.droppable:
      u_logits, u_targets, u_weights, _, _ = self._eval_logits(params,
                                                               self.unconditional(batch))
      u_sum, u_correct, u_weight = cross_entropy_with_integer_labels(u_logits, u_targets,
                                                                     u_weights)
      out['loss_unconditional'] = (u_sum, u_weight)
      out['accuracy_unconditional'] = (u_correct, u_weight)
      if self.start_frames:
        s_sum, _, s_weight = cross_entropy_with_integer_labels(u_logits, u_targets,
                                                               u_weights * start)
        out['loss_unconditional/window_start'] = (s_sum, s_weight)
    return out

  def num_tokens(self, batch):
    """Predicted tokens in the host batch (throughput counts what is trained on)."""
    targets = np.asarray(batch['decoder_target_tokens'])
    weights = np.asarray(batch.get('decoder_loss_weights', np.ones_like(targets)))
    return int(np.sum((weights > 0) & (self.spec.target_levels(targets) >= 0)))


def describe_model(model: StageModel) -> str:
  """One line: stage, parameters, sizes, vocabulary (for logs and the parameter-count test)."""
  cfg = model.config
  return (f'stage {model.spec.name!r}: {model.num_params() / 1e6:.1f}M parameters '
          f'({cfg.num_layers} layers, {cfg.num_heads} heads, d {cfg.embed_dim}, FF {cfg.mlp_dim} '
          f'{cfg.activation}, vocab {cfg.vocab_size} for {model.spec.vocab_size} ids)')
