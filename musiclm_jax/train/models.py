"""The model interface the trainer drives, and the decoder-only language model built on it."""
from __future__ import annotations

import abc
from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.nn import transformer
from musiclm_jax.train.optimizers import OptimizerConfig

Array = jax.Array
PyTree = Any
# Evaluation metrics are (numerator, denominator) pairs, summed over batches and hosts before
# dividing, so a metric over a split does not depend on how it was batched.
Ratio = tuple[Array, Array]

gin.external_configurable(transformer.TransformerConfig, module='musiclm_jax.nn')
# Dtypes for gin files: `TransformerConfig.dtype = %bfloat16` (bf16 compute, float32 params).
gin.constant('bfloat16', jnp.bfloat16)
gin.constant('float32', jnp.float32)


class BaseModel(abc.ABC):
  """What every trainable thing provides: variables, per-group losses, evaluation metrics.

  Parameters come in named groups, each with its own optimizer and its own loss: a language
  model has one group ('model'); a GAN codec has a generator and discriminators, each group
  differentiated only with respect to its own loss. Non-trainable state that the forward pass
  updates (EMA codebooks, batch statistics) lives in `model_state`.
  """

  @property
  @abc.abstractmethod
  def optimizers(self) -> Mapping[str, OptimizerConfig]:
    """Parameter group name -> its optimizer. The groups' names are the keys of `params`."""

  @abc.abstractmethod
  def init_variables(self, rng: Array, batch: Mapping[str, jax.ShapeDtypeStruct]) -> PyTree:
    """Returns {'params': {group: tree}, 'model_state': tree} with Flax logical-axis boxes.

    Called under `jax.eval_shape` (to derive shardings) and inside a jitted init with
    `out_shardings` (so parameters are born sharded): keep it a pure function of `rng`.
    """

  @abc.abstractmethod
  def compute_losses(self, params: PyTree, model_state: PyTree, batch: Mapping[str, Array],
                     rng: Array) -> tuple[dict[str, Array], dict[str, Array], PyTree]:
    """Training forward pass: ({group: scalar loss}, {metric: scalar}, new model_state)."""

  @abc.abstractmethod
  def eval_metrics(self, params: PyTree, model_state: PyTree,
                   batch: Mapping[str, Array]) -> dict[str, Ratio]:
    """Deterministic evaluation: {metric: (numerator, denominator)} summed over the batch."""

  def num_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
    """Tokens (or frames) this host batch carries, for throughput numbers."""
    first = next(iter(batch.values()))
    return int(np.prod(np.shape(first)[:2]))

  # A model whose group losses are already decoupled with stop_gradient (each group's loss
  # carries gradient to that group's parameters only, e.g. a GAN's generator loss sees the
  # discriminator's parameters through stop_gradient and the discriminator loss sees the
  # generated audio through stop_gradient) sets this: the trainer then differentiates the sum of
  # the losses once instead of running the forward pass once per group.
  losses_are_decoupled: bool = False

  # Summaries (audio, spectrogram images) of one evaluation batch: a model that has them
  # overrides `eval_summaries` and sets this.
  has_eval_summaries: bool = False

  def eval_summaries(self, params: PyTree, model_state: PyTree,
                     batch: Mapping[str, Array]) -> dict[str, Array]:
    """{'audio/NAME': [n, samples] in [-1, 1], 'image/NAME': [n, height, width, 3] in [0, 1]}.

    Jitted by the trainer with replicated outputs; keep the outputs few and small. The trainer
    calls it only when `has_eval_summaries` is set; a model without summaries has none.
    """
    del params, model_state, batch
    return {}

  @property
  def summary_sample_rate(self) -> int:
    """Sample rate of the 'audio/...' eval summaries."""
    return 24000


def cross_entropy_with_integer_labels(logits: Array, targets: Array, weights: Array,
                                      z_loss: float = 0.0) -> tuple[Array, Array, Array]:
  """Token cross entropy (float32), optional z-loss (PaLM) to keep the softmax normaliser near 1.

  Returns:
    (sum of weighted losses, sum of weighted correct predictions, sum of weights).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = log_z - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(correct * weights), jnp.sum(weights)


@gin.configurable
class DecoderOnlyLM(BaseModel):
  """A decoder-only LM on SeqIO `LMFeatureConverter` batches (inputs, targets, loss weights).

  The token at position 0 of `decoder_input_tokens` is BOS (id 0, like padding), so the padding
  mask comes from the targets: a position is real when its target is not 0.
  """

  def __init__(self, config: transformer.TransformerConfig,
               optimizer: OptimizerConfig = OptimizerConfig(),
               z_loss: float = 0.0):
    self.config = config
    self.module = transformer.Decoder(config)
    self.optimizer = optimizer
    self.z_loss = z_loss

  @property
  def optimizers(self) -> Mapping[str, OptimizerConfig]:
    return {'model': self.optimizer}

  def init_variables(self, rng, batch):
    tokens = jnp.zeros((1,) + tuple(batch['decoder_input_tokens'].shape[1:]), jnp.int32)
    variables = self.module.init({'params': rng, 'dropout': rng}, tokens, deterministic=True)
    return {'params': {'model': variables['params']}, 'model_state': {}}

  def _segment_ids(self, batch):
    if 'decoder_segment_ids' in batch:
      return batch['decoder_segment_ids']
    return (batch['decoder_target_tokens'] > 0).astype(jnp.int32)

  def logits(self, params, batch, *, rng: Optional[Array] = None) -> Array:
    """Teacher-forced logits [batch, length, vocab]; dropout on when `rng` is given."""
    return self.module.apply(
        {'params': params['model']}, batch['decoder_input_tokens'],
        segment_ids=self._segment_ids(batch), deterministic=rng is None,
        rngs=None if rng is None else {'dropout': rng})

  def compute_losses(self, params, model_state, batch, rng):
    logits = self.logits(params, batch, rng=rng)
    loss_sum, correct, weight = cross_entropy_with_integer_labels(
        logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'], self.z_loss)
    denom = jnp.maximum(weight, 1.0)
    loss = loss_sum / denom
    return {'model': loss}, {'loss': loss, 'accuracy': correct / denom}, model_state

  def eval_metrics(self, params, model_state, batch):
    logits = self.logits(params, batch)
    loss_sum, correct, weight = cross_entropy_with_integer_labels(
        logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'])
    return {'loss': (loss_sum, weight), 'accuracy': (correct, weight)}

  def num_tokens(self, batch):
    return int(np.sum(np.asarray(batch['decoder_loss_weights']) > 0))
