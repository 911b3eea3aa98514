"""The semantic tokenizer: k-means over a w2v-BERT layer's embeddings -> 25 Hz token ids.

Made in two steps after pre-training (`musiclm-jax train --gin_file=runs/train_w2v_bert.gin`):

  musiclm-jax fit_kmeans --gin_file=runs/fit_kmeans.gin --gin_file=models/semantic/tiny_tokenizer.gin \
    --gin.W2V_BERT_DIR="'runs/w2v_bert_tiny'" --gin.TOKENIZER_DIR="'runs/semantic_tokenizer_tiny'"

embeds a sample of the corpus with the trained encoder (layer `layer`, unmasked), fits k-means
on the mesh (musiclm_jax/semantic/kmeans.py) and writes TOKENIZER_DIR:

  variables/       orbax PyTree checkpoint {'params': {'encoder': <the layers the tokenizer
                   runs; with W2VBert.scan_layers, each conformer module it enters whole, its
                   blocks stacked>, 'centroids': [k, embed]}}
  tokenizer.json   the encoder's config, layer, k, where the weights came from, k-means stats

`load_semantic_tokenizer(TOKENIZER_DIR)` gives a `FrozenTokenizer` (audio [batch, samples] ->
int32 tokens [batch, samples // 960] at 25 Hz) for SeqIO tasks and token caches, and
`tokenize(wav)` does the same for one array.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterator, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer, fingerprint
from musiclm_jax.data.model_dir import VARIABLES, read_model_record, save_model_dir
from musiclm_jax.semantic.w2v_bert import W2VBert

logger = logging.getLogger(__name__)

OUTPUT_FEATURE = 'semantic_tokens'
_FORMAT = 'musiclm_jax.semantic_tokenizer/1'


class SemanticTokenizer(nn.Module):
  """w2v-BERT up to `layer`, then the nearest of `num_clusters` centroids per 25 Hz frame.

  Attributes:
    encoder: the w2v-BERT network (its 'params' live under 'encoder').
    layer: the conformer layer read (see `W2VBert.embed`: 1-based over the whole encoder,
      contrastive module first).
    num_clusters: k (the vocabulary size of the semantic tokens).
  """
  encoder: W2VBert
  layer: int
  num_clusters: int

  @property
  def codebook_size(self) -> int:
    return self.num_clusters

  def num_frames(self, num_samples: int) -> int:
    return self.encoder.num_frames(num_samples)

  def setup(self):
    self.centroids = self.param('centroids', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('codebook', 'embed')),
                                (self.num_clusters, self.encoder.embed_dim), jnp.float32)

  def embed(self, audio: jax.Array) -> jax.Array:
    """float32 [batch, frames, embed]: the embeddings the centroids live among."""
    return self.encoder.embed(audio, self.layer).astype(jnp.float32)

  def tokenize(self, audio: jax.Array) -> jax.Array:
    """int32 [batch, samples // hop] tokens of float32 audio [batch, samples]."""
    x = self.embed(audio)
    centroids = jnp.asarray(self.centroids)
    # argmin |x - c|^2 = argmax 2 x.c - |c|^2
    scores = 2.0 * jnp.einsum('btd,kd->btk', x, centroids,
                              precision=jax.lax.Precision.HIGHEST) - jnp.sum(
                                  jnp.square(centroids), axis=-1)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)

  def __call__(self, audio: jax.Array) -> jax.Array:
    return self.tokenize(audio)


# ---------------------------------------------------------------------------
# The encoder's config as JSON (no pickle, no eval).
# ---------------------------------------------------------------------------


def encoder_config(encoder: W2VBert) -> dict[str, Any]:
  config = {}
  for f in dataclasses.fields(encoder):
    if f.name in ('parent', 'name'):
      continue
    value = getattr(encoder, f.name)
    if f.name == 'front_end':
      value = dataclasses.asdict(value)
    elif f.name == 'dtype':
      value = jnp.dtype(value).name
    config[f.name] = value
  return config


def encoder_from_config(config: dict[str, Any]) -> W2VBert:
  config = dict(config)
  front_end = config.pop('front_end')
  known = {f.name for f in dataclasses.fields(W2VBert)}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f'tokenizer.json: unknown W2VBert fields {unknown}')
  fe_known = {f.name for f in dataclasses.fields(LogMelFrontEnd)}
  if set(front_end) - fe_known:
    raise ValueError(f'tokenizer.json: unknown LogMelFrontEnd fields '
                     f'{sorted(set(front_end) - fe_known)}')
  for key in ('fmax', 'win_length', 'top_db'):
    if key in front_end and isinstance(front_end[key], list):
      front_end[key] = tuple(front_end[key])
  config['dtype'] = jnp.dtype(config.get('dtype', 'float32'))
  return W2VBert(front_end=LogMelFrontEnd(**front_end), **config)


# ---------------------------------------------------------------------------
# Loading a pre-training run, embedding a corpus sample, fitting, saving.
# ---------------------------------------------------------------------------


def load_w2v_bert(model_dir: str, step: Optional[int] = None, partitioner=None):
  """(W2VBertModel, params, model_state, step) of a `runs/train_w2v_bert.gin` run directory."""
  from musiclm_jax.semantic.model import W2VBertModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.loading import load_run  # pylint: disable=g-import-not-at-top
  return load_run(
      model_dir, W2VBertModel,
      lambda model: {'audio': jax.ShapeDtypeStruct((jax.device_count(),
                                                    model.network.hop_samples), jnp.float32)},
      step, partitioner, what='w2v-BERT run')


def _prune_to(tree: Any, template: Any, where: str = '') -> Any:
  """The part of `tree` whose paths `template` (a nested dict) has."""
  if not isinstance(template, dict):
    return tree
  missing = [k for k in template if k not in tree]
  if missing:
    raise KeyError(f'{where or "params"}: missing {missing} (is the layer beyond the model?)')
  return {k: _prune_to(tree[k], v, f'{where}/{k}') for k, v in template.items()}


def tokenizer_params(tokenizer: SemanticTokenizer, encoder_params: Any,
                     centroids: np.ndarray) -> dict[str, Any]:
  """{'encoder': the encoder params `tokenize` uses, 'centroids': [k, embed]} as numpy.

  The encoder part is what `tokenize`'s `init` creates: unscanned, the blocks up to the layer
  read; scanned (`W2VBert.scan_layers`), every module it enters with all its stacked blocks
  (the conformer stack scans only the slice it needs when it runs).
  """
  samples = tokenizer.encoder.hop_samples
  shapes = jax.eval_shape(lambda: tokenizer.init(
      jax.random.PRNGKey(0), jnp.zeros((1, samples), jnp.float32), method='tokenize'))
  template = nn.meta.unbox(shapes)['params']
  encoder = _prune_to(nn.meta.unbox(encoder_params), template['encoder'], 'encoder')
  centroids = np.asarray(centroids, np.float32)
  if centroids.shape != template['centroids'].shape:
    raise ValueError(f'centroids {centroids.shape} != {template["centroids"].shape}')
  return {'encoder': jax.tree_util.tree_map(np.asarray, encoder), 'centroids': centroids}


def embedding_batches(tokenizer: SemanticTokenizer, encoder_params: Any, dataset,
                      max_examples: Optional[int] = None) -> Iterator[np.ndarray]:
  """Yields float32 [batch, frames, embed] embeddings of the audio batches of `dataset`."""
  embed = jax.jit(lambda p, a: tokenizer.apply({'params': p}, a, method='embed'))
  centroids = jnp.zeros((tokenizer.num_clusters, tokenizer.encoder.embed_dim), jnp.float32)
  params = {'encoder': nn.meta.unbox(encoder_params), 'centroids': centroids}
  seen = 0
  for batch in dataset:
    audio = np.asarray(batch['audio'], np.float32)
    if max_examples is not None:
      audio = audio[:max_examples - seen]
    if not len(audio):
      break
    yield np.asarray(embed(params, audio))
    seen += len(audio)
    if max_examples is not None and seen >= max_examples:
      break


def save_tokenizer(tokenizer_dir: str, tokenizer: SemanticTokenizer, params: dict[str, Any],
                   info: dict[str, Any], overwrite: bool = False) -> str:
  """Writes TOKENIZER_DIR (variables/ + tokenizer.json) atomically; returns its path.

  An existing tokenizer is only replaced with `overwrite`, and then only once the new one is
  completely written (musiclm_jax/data/model_dir.py).
  """
  record = {'format': _FORMAT, 'encoder': encoder_config(tokenizer.encoder),
            'layer': tokenizer.layer, 'num_clusters': tokenizer.num_clusters,
            'params_sha256': fingerprint({'params': params}), **info}
  return save_model_dir(tokenizer_dir, params, record, 'tokenizer.json', overwrite=overwrite)


def read_tokenizer_record(tokenizer_dir: str) -> dict[str, Any]:
  return read_model_record(tokenizer_dir, 'tokenizer.json', _FORMAT, 'semantic tokenizer',
                           'run `musiclm-jax fit_kmeans` to make one')


def tokenizer_module(tokenizer_dir: str) -> SemanticTokenizer:
  record = read_tokenizer_record(tokenizer_dir)
  return SemanticTokenizer(encoder=encoder_from_config(record['encoder']),
                           layer=int(record['layer']), num_clusters=int(record['num_clusters']))


@gin.configurable
def load_semantic_tokenizer(tokenizer_dir: str = gin.REQUIRED, input_samples: int = 240000,
                            output_feature: str = OUTPUT_FEATURE, batch_size: int = 8,
                            device: Optional[str] = None, verify: bool = True
                            ) -> FrozenTokenizer:
  """A FrozenTokenizer for SeqIO tasks / caches: audio [batch, input_samples] -> 25 Hz tokens.

  Its weights are checked against tokenizer.json's params_sha256 when they are loaded
  (`IntegrityError` when they differ), unless `verify=False`.
  """
  record = read_tokenizer_record(tokenizer_dir)
  return FrozenTokenizer(model=tokenizer_module(tokenizer_dir), output_feature=output_feature,
                         input_samples=input_samples, method='tokenize',
                         checkpoint_dir=os.path.join(os.path.abspath(tokenizer_dir), VARIABLES),
                         expected_params_sha256=record.get('params_sha256') if verify else None,
                         batch_size=batch_size, device=device)


def tokenize(tokenizer_dir: str, wav: np.ndarray) -> np.ndarray:
  """Semantic tokens int32 [batch, samples // 960] of 24 kHz audio [batch, samples] or [samples]."""
  wav = np.asarray(wav, np.float32)
  squeeze = wav.ndim == 1
  wav = wav[None] if squeeze else wav
  tokens = load_semantic_tokenizer(tokenizer_dir, input_samples=wav.shape[-1],
                                   batch_size=min(8, len(wav)))(wav)
  return tokens[0] if squeeze else tokens


@gin.configurable
def fit_kmeans(w2v_bert_dir: str = gin.REQUIRED, tokenizer_dir: str = gin.REQUIRED,
               layer: int = gin.REQUIRED, num_clusters: int = gin.REQUIRED,
               dataset=gin.REQUIRED, num_examples: int = 512, max_frames: Optional[int] = None,
               num_iters: int = 50, seed: int = 0, step: Optional[int] = None,
               partitioner=None, overwrite: bool = False, progress_bar: bool = True) -> str:
  """`musiclm-jax fit_kmeans`: the semantic tokenizer from a w2v-BERT run.

  Args:
    w2v_bert_dir: the pre-training run directory.
    tokenizer_dir: where the tokenizer goes (refused if it exists, unless `overwrite`).
    layer: the encoder layer whose embeddings are clustered (see `W2VBert.embed`).
    num_clusters: k.
    dataset: a DatasetConfig of audio crops (feature_converter 'audio').
    num_examples: crops embedded (every frame of each is a k-means point).
    max_frames: keep at most this many frames, a seeded random subset (None: all).
    num_iters: Lloyd iterations at most.
    seed: seeds the frame subset and the k-means++ initialisation.
    step: the pre-training checkpoint (None: latest).
    partitioner: the mesh k-means runs on (points sharded over 'data').
    overwrite: replace an existing tokenizer_dir (only after the new one is written).
    progress_bar: show a progress bar while embedding.
  """
  from musiclm_jax.data import seqio_input  # pylint: disable=g-import-not-at-top
  from musiclm_jax.semantic import kmeans  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  if os.path.exists(tokenizer_dir) and not overwrite:
    raise FileExistsError(f'{tokenizer_dir} exists; set fit_kmeans.overwrite = True to replace '
                          'it')
  partitioner = partitioner or Partitioner()
  start = time.time()
  # Loading parses the run's config.gin (clearing ours): read our settings first.
  model, params, _, trained_step = load_w2v_bert(w2v_bert_dir, step, partitioner)
  params = jax.device_get(params)
  tokenizer = SemanticTokenizer(encoder=model.network, layer=layer, num_clusters=num_clusters)
  ds = seqio_input.numpy_batches(seqio_input.get_host_dataset(dataset, num_epochs=1,
                                                              drop_remainder=False))
  chunks = []
  with tqdm(total=num_examples, desc='fit_kmeans: embed', unit='clip', dynamic_ncols=True,
            disable=not progress_bar) as bar:
    for emb in embedding_batches(tokenizer, params['model'], ds, num_examples):
      chunks.append(emb.reshape(-1, emb.shape[-1]))
      bar.update(len(emb))
  if not chunks:
    raise ValueError(f'fit_kmeans: {dataset.mixture_or_task_name}:{dataset.split} gave no audio')
  points = np.concatenate(chunks)
  if max_frames is not None and len(points) > max_frames:
    keep = np.random.default_rng(seed).choice(len(points), max_frames, replace=False)
    points = points[np.sort(keep)]
  logger.info('fit_kmeans: %d frames embedded', len(points))
  print(f'fit_kmeans: {len(points)} frames of layer {layer} ({points.shape[1]}-d) from '
        f'{w2v_bert_dir} step {trained_step}; k = {num_clusters}')
  result = kmeans.fit_kmeans(points, num_clusters, num_iters=num_iters,
                             rng=jax.random.PRNGKey(seed), mesh=partitioner.mesh)
  counts = np.asarray(result.counts)
  info = {'source': {'w2v_bert_dir': os.path.abspath(w2v_bert_dir), 'step': int(trained_step)},
          'data': {'task': dataset.mixture_or_task_name, 'split': dataset.split,
                   'examples': num_examples, 'frames': int(len(points))},
          'kmeans': {'inertia_per_frame': float(result.inertia) / len(points),
                     'iterations': int(result.num_iters_run),
                     'empty_clusters': int(np.sum(counts == 0)), 'seed': seed},
          'seconds': round(time.time() - start, 1)}
  variables = tokenizer_params(tokenizer, params['model'], result.centroids)
  path = save_tokenizer(tokenizer_dir, tokenizer, variables, info, overwrite=overwrite)
  print(f'fit_kmeans: wrote {path} (inertia/frame {info["kmeans"]["inertia_per_frame"]:.4f}, '
        f'{info["kmeans"]["iterations"]} iterations, {info["kmeans"]["empty_clusters"]} empty '
        f'clusters, {info["seconds"]} s)')
  return path
