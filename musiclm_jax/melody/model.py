"""`MelodyModel`: the melody embedder trained with a triplet loss in the common trainer.

Batches (tasks/melody.py, with `DatasetConfig(feature_converter='audio', task_feature_lengths=
{'audio': W, 'positive_audio': W, 'melody_label': 1})`):
  audio           float32 [B, W]  a crop of one rendering of a melody
  positive_audio  float32 [B, W]  the crop of another rendering at the same point of the tune
  melody_label    int32 [B, 1]    the melody (0: a padding row of a partial eval batch)

Both crops of every pair are embedded in one forward pass ([2B, W] -> [2B, 192]); every row is an
anchor, the rows with its label its positives, all other rows of the global batch its negatives
(musiclm_jax/melody/losses.py: semi-hard mining by default, or batch-all). One parameter group,
'model'.

Metrics (training and eval): 'loss'; 'accuracy' = in-batch top-1 retrieval (the nearest other
window is of the same melody; about 1 / (2B - 1) by chance); 'active_fraction' (pairs with a
positive hinge), 'semi_hard_fraction' (pairs whose mined negative is farther than the positive),
'distance/positive' and 'distance/negative' (mean squared distances of the pairs and their mined
negatives; a collapsing embedding shows both falling to 0). Eval metrics are (sum, count) ratios
over the split. The corpus-wide retrieval across timbres is musiclm_jax/melody/metrics.py's.
"""
from __future__ import annotations

from typing import Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.melody import losses as losses_lib
from musiclm_jax.melody.encoder import MelodyEncoder
from musiclm_jax.train.models import BaseModel
from musiclm_jax.train.optimizers import OptimizerConfig

Array = jax.Array
MODEL_GROUP = 'model'


@gin.configurable
class MelodyModel(BaseModel):
  """Triplet training of a `MelodyEncoder` on same-melody pairs (see the module docstring)."""

  def __init__(self, network: MelodyEncoder = gin.REQUIRED,
               optimizer: OptimizerConfig = OptimizerConfig(),
               loss: str = 'semi_hard', margin: float = losses_lib.DEFAULT_MARGIN):
    """See the module docstring.

    Args:
      network: the embedder.
      optimizer: the 'model' group's optimizer.
      loss: 'semi_hard' (FaceNet) or 'batch_all'.
      margin: the triplet margin on squared distances between unit vectors (in [0, 4]).
    """
    if loss not in losses_lib.TRIPLET_LOSSES:
      raise ValueError(f'MelodyModel.loss must be one of {tuple(losses_lib.TRIPLET_LOSSES)}, '
                       f'got {loss!r}')
    if margin <= 0:
      raise ValueError(f'MelodyModel.margin must be positive, got {margin}')
    self.network = network
    self.optimizer = optimizer
    self.loss = loss
    self.margin = float(margin)

  @property
  def optimizers(self) -> Mapping[str, OptimizerConfig]:
    return {MODEL_GROUP: self.optimizer}

  def init_variables(self, rng, batch):
    audio = jnp.zeros((1,) + tuple(batch['audio'].shape[1:]), jnp.float32)
    params = self.network.init({'params': rng}, audio)['params']
    return {'params': {MODEL_GROUP: params}, 'model_state': {}}

  def network_params(self, params):
    """The `MelodyEncoder`'s parameter tree out of the train state's {group: tree}."""
    return params[MODEL_GROUP]

  def embed(self, params, audio: Array, rng: Optional[Array] = None) -> Array:
    """Windows [N, W] -> [N, output_dim] unit vectors; dropout and augmentation on when `rng`
    is given."""
    rngs = None
    if rng is not None:
      dropout_rng, augment_rng = jax.random.split(rng)
      rngs = {'dropout': dropout_rng, 'augment': augment_rng}
    return self.network.apply({'params': self.network_params(params)},
                              jnp.asarray(audio, jnp.float32), deterministic=rng is None,
                              rngs=rngs)

  def _pair_terms(self, params, batch, rng=None):
    labels = jnp.asarray(batch['melody_label']).reshape(-1).astype(jnp.int32)
    audio = jnp.concatenate([batch['audio'], batch['positive_audio']], axis=0)
    emb = self.embed(params, audio, rng)
    labels = jnp.concatenate([labels, labels])
    loss, stats = losses_lib.TRIPLET_LOSSES[self.loss](emb, labels, self.margin)
    hits, queries = losses_lib.nearest_neighbour_hits(emb, labels)
    return loss, stats, hits, queries

  def compute_losses(self, params, model_state, batch, rng):
    loss, stats, hits, queries = self._pair_terms(params, batch, rng)
    metrics = {'loss': loss,
               'accuracy': jnp.sum(hits) / jnp.maximum(jnp.sum(queries), 1.0),
               'active_fraction': stats['active_fraction'],
               'semi_hard_fraction': stats['semi_hard_fraction'],
               'distance/positive': stats['positive_distance'],
               'distance/negative': stats['negative_distance']}
    return {MODEL_GROUP: loss}, metrics, model_state

  def eval_metrics(self, params, model_state, batch):
    loss, stats, hits, queries = self._pair_terms(params, batch)
    pairs = stats['num_pairs']
    return {'loss': (loss * pairs, pairs),
            'accuracy': (jnp.sum(hits), jnp.sum(queries)),
            'active_fraction': (stats['active_fraction'] * pairs, pairs),
            'distance/positive': (stats['positive_distance'] * pairs, pairs),
            'distance/negative': (stats['negative_distance'] * pairs, pairs)}

  def num_tokens(self, batch):
    """Windows embedded per batch (throughput is reported in windows per second)."""
    return 2 * int(np.shape(batch['audio'])[0])
