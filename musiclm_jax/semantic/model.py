"""w2v-BERT pre-training in the common trainer (one parameter group, batches of audio crops)."""
from __future__ import annotations

from typing import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.semantic import w2v_bert
from musiclm_jax.train.models import BaseModel, cross_entropy_with_integer_labels
from musiclm_jax.train.optimizers import OptimizerConfig

# Masks and distractors in evaluation come from this fixed key, so an eval metric depends only
# on the weights and the data.
_EVAL_SEED = 0


@gin.configurable
class W2VBertModel(BaseModel):
  """Trains `W2VBert` on {'audio': [batch, samples]} (DatasetConfig.feature_converter = 'audio').

  loss = contrastive + diversity_weight * diversity + mlm_weight * masked prediction, all over
  the masked frames (see musiclm_jax/semantic/w2v_bert.py). The Gumbel temperature decays per
  step from `max_temperature` by `temperature_decay` down to `min_temperature` (wav2vec 2.0:
  2, 0.5, 0.999995 over 400k steps; the tiny config decays faster); the step lives in
  `model_state`. The masked-prediction targets are the quantizer's codes, held constant
  (stop_gradient) in that loss: the quantizer learns from the contrastive side only.
  """

  def __init__(self, network: w2v_bert.W2VBert = gin.REQUIRED,
               optimizer: OptimizerConfig = OptimizerConfig(),
               mask_prob: float = 0.065, mask_span: int = 10, num_negatives: int = 100,
               contrastive_temperature: float = 0.1, diversity_weight: float = 0.1,
               mlm_weight: float = 1.0, max_temperature: float = 2.0,
               min_temperature: float = 0.5, temperature_decay: float = 0.999995):
    self.network = network
    self.optimizer = optimizer
    self.mask_prob = float(mask_prob)
    self.mask_span = int(mask_span)
    self.num_negatives = int(num_negatives)
    self.contrastive_temperature = float(contrastive_temperature)
    self.diversity_weight = float(diversity_weight)
    self.mlm_weight = float(mlm_weight)
    self.max_temperature = float(max_temperature)
    self.min_temperature = float(min_temperature)
    self.temperature_decay = float(temperature_decay)

  @property
  def optimizers(self) -> Mapping[str, OptimizerConfig]:
    return {'model': self.optimizer}

  def init_variables(self, rng, batch):
    audio = jnp.zeros((1,) + tuple(batch['audio'].shape[1:]), jnp.float32)
    frames = self.network.num_frames(audio.shape[-1])
    variables = self.network.init({'params': rng}, audio, jnp.zeros((1, frames), bool))
    return {'params': {'model': variables['params']},
            'model_state': {'step': jnp.zeros((), jnp.int32)}}

  def gumbel_temperature(self, step: jax.Array) -> jax.Array:
    decayed = self.max_temperature * jnp.power(self.temperature_decay,
                                               step.astype(jnp.float32))
    return jnp.maximum(decayed, self.min_temperature)

  def _losses(self, params, audio, rng, temperature, deterministic):
    """The forward pass and every loss term (sums and counts over the masked frames)."""
    batch, frames = audio.shape[0], self.network.num_frames(audio.shape[-1])
    mask_rng, neg_rng, gumbel_rng, dropout_rng = jax.random.split(rng, 4)
    mask = w2v_bert.span_mask(mask_rng, batch, frames, self.mask_prob,
                              min(self.mask_span, frames))
    out = self.network.apply({'params': params['model']}, audio, mask,
                             temperature=temperature, deterministic=deterministic,
                             rngs={'gumbel': gumbel_rng, 'dropout': dropout_rng})
    neg_idx, neg_valid = w2v_bert.sample_negatives(neg_rng, mask, self.num_negatives)
    c_sum, c_correct, n_masked = w2v_bert.contrastive_loss(
        out['context'], out['targets'], mask, neg_idx, neg_valid, self.contrastive_temperature,
        out['target_ids'])
    diversity, perplexity = w2v_bert.diversity_loss(out['quantizer_logits'])
    m_sum, m_correct, _ = cross_entropy_with_integer_labels(
        out['mlm_logits'], jax.lax.stop_gradient(out['target_ids']), mask)
    return {'contrastive': (c_sum, c_correct), 'mlm': (m_sum, m_correct),
            'masked': n_masked, 'diversity': diversity, 'perplexity': perplexity,
            'mask_fraction': jnp.mean(mask.astype(jnp.float32))}

  def compute_losses(self, params, model_state, batch, rng):
    step = model_state['step']
    temperature = self.gumbel_temperature(step)
    terms = self._losses(params, batch['audio'], rng, temperature, deterministic=False)
    denom = jnp.maximum(terms['masked'], 1.0)
    contrastive = terms['contrastive'][0] / denom
    mlm = terms['mlm'][0] / denom
    loss = contrastive + self.diversity_weight * terms['diversity'] + self.mlm_weight * mlm
    metrics = {
        'loss': loss, 'contrastive_loss': contrastive,
        'contrastive_accuracy': terms['contrastive'][1] / denom,
        'mlm_loss': mlm, 'mlm_accuracy': terms['mlm'][1] / denom,
        'diversity_loss': terms['diversity'], 'codebook_perplexity': terms['perplexity'],
        'mask_fraction': terms['mask_fraction'], 'gumbel_temperature': temperature,
    }
    return {'model': loss}, metrics, {**model_state, 'step': step + 1}

  def eval_metrics(self, params, model_state, batch):
    terms = self._losses(params, batch['audio'], jax.random.PRNGKey(_EVAL_SEED), None,
                         deterministic=True)
    n = terms['masked']
    return {'contrastive_loss': (terms['contrastive'][0], n),
            'contrastive_accuracy': (terms['contrastive'][1], n),
            'mlm_loss': (terms['mlm'][0], n), 'mlm_accuracy': (terms['mlm'][1], n),
            'codebook_perplexity': (terms['perplexity'], jnp.ones(()))}

  def num_tokens(self, batch):
    audio = np.shape(batch['audio'])
    return int(audio[0] * self.network.num_frames(audio[1]))
