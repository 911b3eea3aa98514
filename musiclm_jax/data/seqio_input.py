"""Per-host SeqIO input pipelines with a resumable position, batched as numpy for the trainer."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Iterator, Mapping, Optional

import gin
import jax
import numpy as np

from musiclm_jax.common.tf_setup import quiet_tensorflow


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which SeqIO task or mixture to read and how to batch it.

  Attributes:
    mixture_or_task_name: a registered SeqIO task or mixture.
    task_feature_lengths: e.g. {'targets': 64}.
    split: dataset split.
    batch_size: the GLOBAL batch size (see `process_input` for what each process reads).
    shuffle: shuffle (training); evaluation reads in order.
    seed: shuffle seed; with the same seed the stream is the same, which exact resume needs.
    pack: pack several examples per row (seqio's packing) instead of padding each.
    use_cached: read a SeqIO cache written offline (`musiclm-jax tokenize`); its provenance is
      checked first (musiclm_jax.data.token_cache.check_cache_provenance), so a cache made by
      other tokenizer weights or other pre-cache preprocessing raises StaleCacheError.
    module: a module to import first so the task is registered (e.g. 'tasks.toy').
    tfds_data_dir: the TFDS data directory the task's corpus was prepared in (`musiclm-jax
      build_data`); None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    feature_converter: 'lm' (seqio's LMFeatureConverter: decoder inputs, targets, loss weights),
      'prefix_lm' (seqio's PrefixLMFeatureConverter: 'inputs' and 'targets' concatenated into
      one decoder sequence of inputs + targets positions, loss weights on the targets only;
      packed with `pack`; the stage LMs, musiclm_jax/stages) or 'audio' (only the features
      named in task_feature_lengths, each of exactly that length: e.g. {'audio': 48000} gives
      [batch, 48000] float32 crops for the codec).
    cache_dir: a cache root to add to SeqIO's global cache directories (the CACHE_DIR given to
      `musiclm-jax tokenize`): where a cached task (use_cached), or a task that reads another
      task's cache (the stage tasks), finds it; None relies on the directories already added.
    process_input: how a multi-process run splits the input (one process reads everything):
      'full': every process reads the whole stream and batches the whole global batch, and each
      device takes its rows of it; the global batches are the same for any number of processes,
      so a multi-host run sees exactly the batches of a single-process one and resumes on another
      process count without changing the data, at the price of every host reading (and
      preprocessing) all the input. 'shard': seqio's ShardInfo: each process reads a disjoint
      1/process_count of the input and batches batch_size / process_count rows (T5X's way;
      input reading scales with hosts, but the stream depends on the process count).
  """
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = 'train'
  batch_size: int = 8
  shuffle: bool = True
  seed: int = 0
  pack: bool = False
  use_cached: bool = False
  module: Optional[str] = None
  cache_dir: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  feature_converter: str = 'lm'
  process_input: str = 'full'


FEATURE_CONVERTERS = ('lm', 'prefix_lm', 'audio')
PROCESS_INPUTS = ('full', 'shard')


def _feature_converter(config: DatasetConfig):
  import seqio  # pylint: disable=g-import-not-at-top  # pulls TensorFlow
  if config.feature_converter == 'lm':
    return seqio.LMFeatureConverter(pack=config.pack)
  if config.feature_converter == 'prefix_lm':
    return seqio.PrefixLMFeatureConverter(pack=config.pack, loss_on_targets_only=True)
  if config.feature_converter == 'audio':
    # The task crops to the lengths itself (crop_to_sequence_length); _select_features keeps
    # only those features, with static shapes, so that they batch.
    return seqio.PassThroughFeatureConverter()
  raise ValueError(f'DatasetConfig.feature_converter={config.feature_converter!r}: one of '
                   f'{FEATURE_CONVERTERS}')


def _select_features(ds, lengths: Mapping[str, int]):
  tf = quiet_tensorflow()

  def select(ex):
    missing = [k for k in lengths if k not in ex]
    if missing:
      raise KeyError(f'features {missing} are not in the task\'s examples ({sorted(ex)})')
    return {k: tf.ensure_shape(ex[k], [lengths[k]]) for k in lengths}

  return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def reads_shard(config: DatasetConfig) -> bool:
  """Whether this process reads only its share of the input (else the whole global batch)."""
  if config.process_input not in PROCESS_INPUTS:
    raise ValueError(f'DatasetConfig.process_input={config.process_input!r}: one of '
                     f'{PROCESS_INPUTS}')
  return config.process_input == 'shard' and jax.process_count() > 1


def host_batch_size(config: DatasetConfig) -> int:
  """Rows of each batch this process reads: the global batch, or its share of it."""
  if not reads_shard(config):
    return config.batch_size
  n = jax.process_count()
  if config.batch_size % n:
    raise ValueError(f'DatasetConfig.batch_size={config.batch_size} does not divide over '
                     f'{n} processes')
  return config.batch_size // n


def _check_cache(config: DatasetConfig):
  """Fails before reading a cache that is missing or was made by other tokenizers."""
  import seqio  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import token_cache  # pylint: disable=g-import-not-at-top
  if config.cache_dir:
    seqio.add_global_cache_dirs([config.cache_dir])
  token_cache.check_dataset_cache(config.mixture_or_task_name, config.split,
                                  expected_root=config.cache_dir)


def get_host_dataset(config: DatasetConfig, num_epochs: Optional[int] = None,
                     drop_remainder: bool = True):
  """This process's input as a batched tf.data.Dataset (`host_batch_size` rows a batch).

  Args:
    config: what to read.
    num_epochs: None repeats forever (training); 1 reads the split once (evaluation).
    drop_remainder: drop a final partial batch.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  if config.module:
    importlib.import_module(config.module)
  # seqio keeps the TFDS data directory process-global: set it for this pipeline only.
  previous_tfds_dir = seqio.utils._TFDS_DATA_DIR_OVERRIDE  # pylint: disable=protected-access
  if config.tfds_data_dir:
    seqio.set_tfds_data_dir_override(config.tfds_data_dir)
  try:
    return _host_dataset(config, num_epochs, drop_remainder)
  finally:
    seqio.set_tfds_data_dir_override(previous_tfds_dir)


def _host_dataset(config: DatasetConfig, num_epochs: Optional[int], drop_remainder: bool):
  tf = quiet_tensorflow()
  import seqio  # pylint: disable=g-import-not-at-top
  if config.cache_dir:
    seqio.add_global_cache_dirs([config.cache_dir])
  if config.use_cached:
    _check_cache(config)
  shard_info = None
  if reads_shard(config):
    shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
  ds = seqio.get_dataset(
      config.mixture_or_task_name, dict(config.task_feature_lengths),
      feature_converter=_feature_converter(config), dataset_split=config.split,
      use_cached=config.use_cached, shuffle=config.shuffle, num_epochs=num_epochs,
      shard_info=shard_info, verbose=False, seed=config.seed)
  if config.feature_converter == 'audio':
    ds = _select_features(ds, config.task_feature_lengths)
  ds = ds.batch(host_batch_size(config), drop_remainder=drop_remainder)
  return ds.prefetch(tf.data.AUTOTUNE)


def numpy_batches(ds) -> Iterator[dict[str, np.ndarray]]:
  for batch in ds.as_numpy_iterator():
    yield dict(batch)


def batch_spec_of(ds, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the GLOBAL batch, from a host dataset's element spec."""
  return {name: jax.ShapeDtypeStruct((global_batch_size,) + tuple(s.shape[1:]),
                                     np.dtype(s.dtype.as_numpy_dtype))
          for name, s in ds.element_spec.items()}


def global_batch_spec(config: DatasetConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the GLOBAL batch `config` describes (builds the pipeline to see)."""
  return batch_spec_of(get_host_dataset(config, num_epochs=1), config.batch_size)
