"""MuLan: audio and text towers projected into one shared space, trained contrastively.

`MuLan` is the embedder (a Flax module): an audio tower on log-mel (`ResNetAudioTower`, the
paper's ResNet-50, or `SpectrogramTransformerTower`), a text tower (`BertEncoder`: the
all-MiniLM-L6-v2 sizes by default, loadable with its pretrained weights, or any BERT config
trained from scratch, e.g. over the SentencePiece caption vocabulary of
musiclm_jax/mulan/vocabulary.py with `pretrained_text=False`) mean-pooled over real tokens, and
a bias-free linear projection of each into a shared `embed_dim` space (128 in the paper),
L2-normalised.

`MuLanModel` trains it in the common trainer on batches
{'audio': [B, samples] float32, 'text_ids': [B, L] int32, 'text_mask': [B, L] int32} with the
softmax (CLIP) or sigmoid (SigLIP) contrastive loss over the whole global batch (see
musiclm_jax/mulan/losses.py). The learned temperature (and SigLIP's bias) are parameters of the
'model' group beside the network's, outside the `MuLan` module: inference needs only the
embedder.

Typical use:

  model = MuLanModel(MuLan(audio_tower=ResNetAudioTower()), pretrained_text=True)
  # ... train with musiclm_jax.train; then, with the trained state:
  network_params = model.network_params(state.params)
  audio_emb = model.network.apply({'params': network_params}, audio, method=MuLan.embed_audio)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.mulan import losses as losses_lib
from musiclm_jax.mulan.audio import ResNetAudioTower
from musiclm_jax.mulan.text import BertEncoder, load_minilm_params, mean_pool
from musiclm_jax.nn.attention import DenseGeneral
from musiclm_jax.train.models import BaseModel
from musiclm_jax.train.optimizers import OptimizerConfig

Array = jax.Array
Dtype = Any
PyTree = Any

MODEL_GROUP = 'model'
TEXT_GROUP = 'text'
TEXT_TOWER = 'text_tower'
SOFTMAX_INIT_LOG_TEMPERATURE = math.log(1.0 / 0.07)  # CLIP
SIGMOID_INIT_LOG_TEMPERATURE = math.log(10.0)        # SigLIP
SIGMOID_INIT_BIAS = -10.0                            # SigLIP


@gin.configurable
class MuLan(nn.Module):
  """The two towers and their projections into the shared embedding space.

  Parameters: 'audio_tower', 'text_tower', 'audio_projection', 'text_projection'. The
  projections are bias-free `DenseGeneral`s (kernel axes ('embed', 'mlp')), as in CLIP.

  Attributes:
    audio_tower: a module mapping audio [B, samples] -> [B, width] (`deterministic` keyword).
    text_tower: a `BertEncoder`; default the all-MiniLM-L6-v2 sizes without the (unused)
      pooler. Its token states are mean-pooled over real tokens (as all-MiniLM-L6-v2's sentence
      embeddings are).
    embed_dim: width of the shared space (128 in the paper).
    dtype: compute dtype of the projections.
    param_dtype: parameter dtype of the projections.
  """
  audio_tower: nn.Module = dataclasses.field(default_factory=ResNetAudioTower)
  text_tower: BertEncoder = dataclasses.field(
      default_factory=lambda: BertEncoder(pooler=False))
  embed_dim: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.audio_projection = DenseGeneral(self.embed_dim, kernel_axes=('embed', 'mlp'),
                                         dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_projection = DenseGeneral(self.embed_dim, kernel_axes=('embed', 'mlp'),
                                        dtype=self.dtype, param_dtype=self.param_dtype)

  def embed_audio(self, audio: Array, deterministic: bool = True) -> Array:
    """Audio [B, samples] at the tower's sample rate -> float32 [B, embed_dim] unit vectors."""
    h = self.audio_tower(audio, deterministic=deterministic)
    out = self.audio_projection(h).astype(jnp.float32)
    return nn.with_logical_constraint(losses_lib.l2_normalize(out), ('batch', None))

  def embed_text(self, ids: Array, mask: Array, deterministic: bool = True) -> Array:
    """Token ids and mask [B, L] (1 on real tokens) -> float32 [B, embed_dim] unit vectors."""
    states = self.text_tower(ids, mask, deterministic=deterministic)
    out = self.text_projection(mean_pool(states, mask)).astype(jnp.float32)
    return nn.with_logical_constraint(losses_lib.l2_normalize(out), ('batch', None))

  def __call__(self, audio: Array, ids: Array, mask: Array,
               deterministic: bool = True) -> tuple[Array, Array]:
    """(embed_audio(audio), embed_text(ids, mask))."""
    return (self.embed_audio(audio, deterministic),
            self.embed_text(ids, mask, deterministic))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _insert_constants(boxed: PyTree, values: Mapping[str, Any], what: str) -> PyTree:
  """Replaces the leaves of a (boxed) parameter tree with `values` (same paths and shapes)."""
  flat_values = _flatten(values)

  def replace(path, leaf):
    key = tuple(getattr(p, 'key', p) for p in path)
    if key not in flat_values:
      raise ValueError(f'{what}: no value for parameter {"/".join(key)}')
    value = flat_values[key]
    target = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    if tuple(np.shape(value)) != tuple(target.shape):
      raise ValueError(f'{what}: {"/".join(key)} has shape {np.shape(value)}, the parameter '
                       f'{tuple(target.shape)}')
    constant = jnp.asarray(value, target.dtype)
    return leaf.replace_boxed(constant) if isinstance(leaf, nn.LogicallyPartitioned) else constant

  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  extra = set(flat_values) - {tuple(getattr(p, 'key', p) for p in path) for path, _ in leaves}
  if extra:
    raise ValueError(f'{what}: values for unknown parameters {sorted(extra)}')
  return jax.tree_util.tree_map_with_path(
      replace, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@gin.configurable
class MuLanModel(BaseModel):
  """Contrastive training of `MuLan` on (audio crop, caption) pairs.

  Parameter groups: 'model' (everything, including `log_temperature` and, for the sigmoid loss,
  `logit_bias`), or, with `text_optimizer`, 'model' (audio tower, projections, temperature) and
  'text' (the text tower) with its own optimizer (e.g. a 10x lower learning rate for the
  pretrained tower). With two groups the one shared loss is differentiated once
  (`losses_are_decoupled`): the 'model' entry carries the loss and the 'text' entry is 0, so the
  gradient of their sum with respect to each group is exactly that of the loss (the reported
  'loss/text' is therefore 0; read 'loss').

  The temperature: logits are exp(log_temperature) * cosine, log_temperature learned and clipped
  to `max_log_temperature` (CLIP's 100) in the loss. Initial values: log(1 / 0.07) for
  'softmax', log(10) and bias -10 for 'sigmoid' (SigLIP), unless given.

  Pretrained text tower: with `pretrained_text`, all-MiniLM-L6-v2's weights (or those of
  `text_safetensors`) are read once, in `__init__`, as numpy arrays, and `init_variables` puts
  them in place of the text tower's random initial values as constants. `init_variables` thus
  stays a pure function of `rng` (under `jax.eval_shape` they are just shapes, under the jitted
  init of `StepFunctions` they are constants written straight into the sharded parameters).
  The text tower must then have the checkpoint's sizes (the `BertEncoder` defaults).

  Duplicate captions: with `dedup_captions`, rows with identical `text_ids` rows are the same
  text (softmax: removed from each other's negatives; sigmoid: positives; recall: removed from
  the ranking), see musiclm_jax/mulan/losses.py.

  Evaluation (`eval_metrics`) within each eval batch: loss, accuracy both ways, recall@k for
  `recall_ks` both ways, as (sum over rows, number of rows); rows whose `text_mask` is all zero
  pad a partial batch and are ignored.
  """

  def __init__(self,
               network: MuLan = gin.REQUIRED,
               optimizer: OptimizerConfig = OptimizerConfig(),
               text_optimizer: Optional[OptimizerConfig] = None,
               loss: str = 'softmax',
               init_log_temperature: Optional[float] = None,
               init_logit_bias: float = SIGMOID_INIT_BIAS,
               max_log_temperature: float = math.log(100.0),
               learn_temperature: bool = True,
               pretrained_text: bool = False,
               text_safetensors: Optional[str] = None,
               dedup_captions: bool = True,
               recall_ks: Sequence[int] = (1, 10)):
    """See the class docstring.

    Args:
      network: the `MuLan` embedder.
      optimizer: the 'model' group's optimizer.
      text_optimizer: when set, the text tower is a separate 'text' group with this optimizer.
      loss: 'softmax' (CLIP / MuLan) or 'sigmoid' (SigLIP).
      init_log_temperature: initial log logit scale (default by loss, see the class docstring).
      init_logit_bias: initial SigLIP bias ('sigmoid' only).
      max_log_temperature: clip of the log logit scale.
      learn_temperature: when false, the temperature (and bias) stay at their initial values.
      pretrained_text: load all-MiniLM-L6-v2 into the text tower at init.
      text_safetensors: another BERT checkpoint in Hugging Face safetensors form.
      dedup_captions: treat identical `text_ids` rows as the same text.
      recall_ks: k of the eval recall@k metrics.
    """
    if loss not in ('softmax', 'sigmoid'):
      raise ValueError(f"MuLanModel.loss must be 'softmax' or 'sigmoid', got {loss!r}")
    self.network = network
    self.optimizer = optimizer
    self.text_optimizer = text_optimizer
    self.loss = loss
    if init_log_temperature is None:
      init_log_temperature = (SOFTMAX_INIT_LOG_TEMPERATURE if loss == 'softmax'
                              else SIGMOID_INIT_LOG_TEMPERATURE)
    self.init_log_temperature = float(init_log_temperature)
    self.init_logit_bias = float(init_logit_bias)
    self.max_log_temperature = float(max_log_temperature)
    self.learn_temperature = bool(learn_temperature)
    self.dedup_captions = bool(dedup_captions)
    self.recall_ks = tuple(int(k) for k in recall_ks)
    self.pretrained_text_params = None
    if pretrained_text or text_safetensors:
      self.pretrained_text_params = load_minilm_params(network.text_tower, text_safetensors)
    self.losses_are_decoupled = text_optimizer is not None

  @property
  def optimizers(self) -> Mapping[str, OptimizerConfig]:
    groups = {MODEL_GROUP: self.optimizer}
    if self.text_optimizer is not None:
      groups[TEXT_GROUP] = self.text_optimizer
    return groups

  # ------------------------------------------------------------------ variables
  def init_variables(self, rng, batch):
    audio = jnp.zeros((1,) + tuple(batch['audio'].shape[1:]), jnp.float32)
    ids = jnp.zeros((1,) + tuple(batch['text_ids'].shape[1:]), jnp.int32)
    mask = jnp.ones_like(ids)
    params = dict(self.network.init({'params': rng}, audio, ids, mask)['params'])
    if self.pretrained_text_params is not None:
      params[TEXT_TOWER] = _insert_constants(params[TEXT_TOWER], self.pretrained_text_params,
                                             'pretrained text tower')
    params['log_temperature'] = nn.LogicallyPartitioned(
        jnp.asarray(self.init_log_temperature, jnp.float32), names=())
    if self.loss == 'sigmoid':
      params['logit_bias'] = nn.LogicallyPartitioned(
          jnp.asarray(self.init_logit_bias, jnp.float32), names=())
    groups = {MODEL_GROUP: params}
    if self.text_optimizer is not None:
      groups[TEXT_GROUP] = params.pop(TEXT_TOWER)
    return {'params': groups, 'model_state': {}}

  def network_params(self, params: PyTree) -> PyTree:
    """The `MuLan` module's parameter tree out of the train state's {group: tree}."""
    tree = {k: v for k, v in params[MODEL_GROUP].items()
            if k not in ('log_temperature', 'logit_bias')}
    if TEXT_GROUP in params:
      tree[TEXT_TOWER] = params[TEXT_GROUP]
    return tree

  def _scales(self, params):
    log_t = params[MODEL_GROUP]['log_temperature']
    bias = params[MODEL_GROUP].get('logit_bias', jnp.zeros((), jnp.float32))
    if not self.learn_temperature:
      log_t, bias = jax.lax.stop_gradient(log_t), jax.lax.stop_gradient(bias)
    return jnp.minimum(log_t, self.max_log_temperature), bias

  # ------------------------------------------------------------------ forward
  def embed(self, params, batch, rng: Optional[Array] = None) -> tuple[Array, Array]:
    """(audio, text) embeddings [B, embed_dim] of a batch; dropout on when `rng` is given."""
    return self.network.apply(
        {'params': self.network_params(params)}, batch['audio'].astype(jnp.float32),
        batch['text_ids'], batch['text_mask'], deterministic=rng is None,
        rngs=None if rng is None else {'dropout': rng})

  def _terms(self, params, batch, audio_emb, text_emb, valid=None):
    log_t, bias = self._scales(params)
    text_ids = batch['text_ids'] if self.dedup_captions else None
    if self.loss == 'softmax':
      terms = losses_lib.softmax_contrastive_terms(audio_emb, text_emb, log_t, text_ids, valid)
      terms['loss'] = 0.5 * (terms['audio_to_text_loss'] + terms['text_to_audio_loss'])
    else:
      terms = losses_lib.sigmoid_contrastive_terms(audio_emb, text_emb, log_t, bias, text_ids,
                                                   valid)
    return terms, log_t, bias

  def compute_losses(self, params, model_state, batch, rng):
    audio_emb, text_emb = self.embed(params, batch, rng)
    terms, log_t, bias = self._terms(params, batch, audio_emb, text_emb)
    n = jnp.maximum(jnp.sum(terms['valid']), 1.0)
    loss = jnp.sum(terms['loss']) / n
    b = audio_emb.shape[0]
    off_diagonal = lambda m: (jnp.sum(m) - jnp.trace(m)) / max(b * (b - 1), 1)
    cos = jnp.einsum('id,jd->ij', audio_emb, text_emb)
    metrics = {
        'loss': loss,
        'accuracy/audio_to_text': jnp.sum(terms['audio_to_text_correct']) / n,
        'accuracy/text_to_audio': jnp.sum(terms['text_to_audio_correct']) / n,
        'logit_scale': jnp.exp(log_t),
        # A loss that does not move shows here first: pairs no closer than non-pairs, or one
        # tower's embeddings collapsed onto one point (their mutual cosine near 1).
        'cosine/pairs': jnp.trace(cos) / b, 'cosine/non_pairs': off_diagonal(cos),
        'cosine/audio_audio': off_diagonal(jnp.einsum('id,jd->ij', audio_emb, audio_emb)),
        'cosine/text_text': off_diagonal(jnp.einsum('id,jd->ij', text_emb, text_emb)),
    }
    if self.loss == 'sigmoid':
      metrics['logit_bias'] = bias
    losses = {MODEL_GROUP: loss}
    if self.text_optimizer is not None:
      losses[TEXT_GROUP] = jnp.zeros_like(loss)  # see the class docstring
    return losses, metrics, model_state

  def eval_metrics(self, params, model_state, batch):
    audio_emb, text_emb = self.embed(params, batch)
    valid = jnp.sum(batch['text_mask'], axis=-1) > 0
    terms, _, _ = self._terms(params, batch, audio_emb, text_emb, valid)
    n = jnp.sum(terms['valid'])
    metrics = {'loss': (jnp.sum(terms['loss']), n),
               'accuracy/audio_to_text': (jnp.sum(terms['audio_to_text_correct']), n),
               'accuracy/text_to_audio': (jnp.sum(terms['text_to_audio_correct']), n)}
    text_ids = batch['text_ids'] if self.dedup_captions else None
    a2t = losses_lib.retrieval_ranks(audio_emb, text_emb, text_ids, valid)
    t2a = losses_lib.retrieval_ranks(text_emb, audio_emb, text_ids, valid)
    w = terms['valid']
    for k in self.recall_ks:
      metrics[f'recall@{k}/audio_to_text'] = (jnp.sum((a2t < k) * w), n)
      metrics[f'recall@{k}/text_to_audio'] = (jnp.sum((t2a < k) * w), n)
    return metrics

  def num_tokens(self, batch):
    """Clips in the batch (throughput is reported in clips per second)."""
    return int(np.shape(batch['audio'])[0])
