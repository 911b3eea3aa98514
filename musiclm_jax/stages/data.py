"""SeqIO tasks of the stage LMs: one token cache per corpus, read by every stage with its own crop.

Two kinds of task:

1. A stage-token task (`register_stage_tokens_task`), cacheable with `musiclm-jax tokenize`:
   audio -> `audio_to_float` -> a random crop of `clip_seconds` -> every frozen tokenizer
   (`tokenize_streams`: semantic tokens, SoundStream codes of every level, MuLan tokens; see
   stages/tokens.py) -> `seqio.CacheDatasetPlaceholder()`. The cache holds, per crop,
   `semantic_tokens` [frames], `codec_tokens` [frames, levels], `mulan_tokens` [levels] (and
   any other tokenizer's feature, e.g. `melody_tokens` [windows, levels]), plus `caption`,
   `aspects`, `id`; no audio.
   Its provenance (tokenizer weights, crop) is checked whenever a stage reads it.

2. A stage task (`register_stage_task(tokens_task, spec)`, or `stage_task` in gin): reads the
   completed cache of a stage-token task (`CachedTokensSource`; the cache is found in SeqIO's
   cache directories: DatasetConfig.cache_dir) and `stage_examples` turns each cached crop into
   one stage example: an aligned random crop of the time-aligned streams (the same stretch of
   audio for semantic and codec tokens; from the clip's start when the stage conditions on melody
   tokens, which describe the clip from its start), the clip-level streams whole (every level
   and frame of their frozen model: the spec must match it), every stream offset into
   its id range and flattened frame-major (StageSpec.encode_stream): 'inputs' = the conditioning
   prefix, 'targets' = the predicted stream. The crop is the task's `crop_seconds` (the run
   files' CROP_SECONDS), or, without one, comes from the task feature length of 'targets'; so
   one cache serves the semantic (30 s in the paper), coarse (10 s) and fine (3 s) stages alike.
   A cached clip shorter than the crop gives a shorter example (padded or packed by the feature
   converter).

Read a stage task with `DatasetConfig(feature_converter='prefix_lm', pack=...)` and
`task_feature_lengths=stage_feature_lengths(spec, crop_seconds, examples_per_row)`: SeqIO's
PrefixLMFeatureConverter concatenates prefix and targets, pads (or packs several examples per
row, with T5X segment ids and positions) to `inputs + targets` positions and puts loss weights on
the targets only.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Optional, Sequence, Union

import gin
import seqio

from musiclm_jax.data import preprocessors
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.stages.spec import (CODEC_FEATURE, MELODY_FEATURE, MULAN_FEATURE,
                                     SEMANTIC_FEATURE, StageSpec, TokenStream)
from musiclm_jax.common.tf_setup import quiet_tensorflow

tf = quiet_tensorflow()
logger = logging.getLogger(__name__)

# Frozen tokenizers: a list, or an object building them on first use (stages.tokens
# .StageTokenizers) with `frozen_tokenizers()` and `output_ranks()`.
Tokenizers = Union[Sequence[FrozenTokenizer], Any]

# Stage tasks shuffle their examples (small: token ids) with this buffer.
SHUFFLE_BUFFER_SIZE = 1000


def _frozen_tokenizers(tokenizers: Tokenizers) -> list[FrozenTokenizer]:
  if hasattr(tokenizers, 'frozen_tokenizers'):
    return list(tokenizers.frozen_tokenizers())
  return list(tokenizers)


def _output_ranks(tokenizers: Tokenizers) -> dict[str, int]:
  if hasattr(tokenizers, 'output_ranks'):
    return dict(tokenizers.output_ranks())
  return {t.output_feature: len(t.output_spec().shape) for t in tokenizers}


# ---------------------------------------------------------------------------------------------
# The stage-token cache.


def tokenize_streams(dataset, *, tokenizers: Tokenizers, input_feature: str = 'audio'):
  """Adds every frozen tokenizer's tokens to each example, then drops the audio.

  Args:
    dataset: examples with float32 audio crops of the tokenizers' `input_samples`.
    tokenizers: FrozenTokenizers, or an object with `frozen_tokenizers()` (built here, when the
      pipeline is built).
    input_feature: the audio feature (dropped from the output).
  """
  for tokenizer in _frozen_tokenizers(tokenizers):
    dataset = preprocessors.tokenize_audio(dataset, tokenizer=tokenizer, keep_input=True)

  def drop_audio(ex):
    ex = dict(ex)
    ex.pop(input_feature, None)
    return ex

  return dataset.map(drop_audio, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _codes_feature(rank: int) -> seqio.Feature:
  # Codes of frozen models, not a model's vocabulary: their sizes are checked by each stage task
  # against its spec when it reads them.
  return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.int32, rank=rank)


def register_stage_tokens_task(task_name: str, tfds_name: str, tokenizers: Tokenizers, *,
                               clip_seconds: float, splits: Optional[Sequence[str]] = None,
                               tfds_data_dir: Optional[str] = None,
                               source: Optional[seqio.DataSource] = None) -> seqio.Task:
  """Registers (once) a cacheable task: audio crops of `clip_seconds` -> every tokenizer's tokens.

  Args:
    task_name: the SeqIO task name (cache it with `musiclm-jax tokenize`).
    tfds_name: 'name/config:version' of a prepared audio corpus (the common audio schema).
    tokenizers: FrozenTokenizers whose `input_samples` are the crop, or a lazy holder such as
      `stages.tokens.StageTokenizers(clip_seconds)`.
    clip_seconds: the crop; the stage crops are cut from it (at most this long).
    splits: the splits to expose (None: all the prepared dataset has).
    tfds_data_dir: where the corpus was prepared (None: TFDS's default or the tokenize run's
      TFDS_DATA_DIR).
    source: another seqio DataSource with the common audio schema (instead of `tfds_name`).

  Returns:
    The task (the registered one if the name exists already).
  """
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)
  samples = int(round(clip_seconds * preprocessors.SAMPLE_RATE))
  if not hasattr(tokenizers, 'frozen_tokenizers'):
    for t in tokenizers:
      if t.input_samples != samples:
        raise ValueError(f'{task_name}: {t!r} takes {t.input_samples} samples, but the task crops '
                         f'{clip_seconds} s = {samples} samples')
  elif getattr(tokenizers, 'input_samples', samples) != samples:
    raise ValueError(f'{task_name}: {tokenizers!r} takes {tokenizers.input_samples} samples, but '
                     f'the task crops {clip_seconds} s = {samples} samples')
  features = {k: v for k, v in preprocessors.AUDIO_FEATURES.items() if k != 'audio'}
  features.update({name: _codes_feature(rank)
                   for name, rank in _output_ranks(tokenizers).items()})
  if source is None:
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits)
  return seqio.TaskRegistry.add(
      task_name, source=source,
      preprocessors=[
          preprocessors.audio_to_float,
          functools.partial(preprocessors.random_crop, clip_seconds=clip_seconds),
          functools.partial(tokenize_streams, tokenizers=tokenizers),
          seqio.CacheDatasetPlaceholder(required=True),
      ],
      output_features=features)


# ---------------------------------------------------------------------------------------------
# Stage examples from the cache.


# The gin bindings that size a stream of each cached feature (named in errors).
_SIZE_BINDINGS = {
    SEMANTIC_FEATURE: 'TokenSizes.semantic_codes',
    CODEC_FEATURE: 'TokenSizes.codec_levels / codec_codes',
    MULAN_FEATURE: 'TokenSizes.mulan_levels / mulan_codes',
    MELODY_FEATURE: 'TokenSizes.melody_levels / melody_codes / melody_frames',
}


def _stream_codes(ex, s: TokenStream, spec: StageSpec):
  """int32 [frames, levels] codes of stream `s` from its cached feature (range-checked)."""
  where = f'stage {spec.name!r}, stream {s.name!r} (feature {s.feature!r})'
  if s.feature not in ex:
    raise KeyError(f'{where}: the cached examples have no feature {s.feature!r} (they have '
                   f'{sorted(ex)}); cache it with a tokenizer whose output_feature is that')
  x = tf.cast(ex[s.feature], tf.int32)
  if x.shape.rank == 1:
    x = x[:, None] if (s.time_aligned or s.num_levels == 1) else x[None, :]
  elif x.shape.rank != 2:
    raise ValueError(f'{where}: expected cached codes of rank 1 or 2, got {x.shape}')
  need = s.first_level + s.num_levels
  sizes = _SIZE_BINDINGS.get(s.feature, 'TokenSizes')
  checks = [tf.debugging.assert_greater_equal(
      tf.shape(x)[1], need, message=f'{where}: the cache has fewer than {need} levels')]
  if not s.time_aligned:
    # A conditioner's tokens are used whole, as the pipeline checks (assemble_pipeline): every
    # level, and the frames its model gives a cached clip.
    checks.append(tf.debugging.assert_equal(
        tf.shape(x)[0], s.frames, message=f'{where}: the spec expects {s.frames} frame(s) per '
        f'clip, the cache has another number; bind {sizes} to what the frozen model gives a '
        'cached clip'))
    if not s.first_level:
      checks.append(tf.debugging.assert_equal(
          tf.shape(x)[1], need, message=f'{where}: the spec uses {need} level(s), the cache '
          f'has another number; bind {sizes} to the frozen model\'s levels'))
  with tf.control_dependencies(checks):
    x = x[:, s.first_level:need]
  checks = [
      tf.debugging.assert_non_negative(x, message=f'{where}: negative codes in the cache'),
      tf.debugging.assert_less(
          x, s.codebook_size, message=f'{where}: cached codes >= the spec\'s codebook_size '
          f'{s.codebook_size}; the spec ({sizes} in gin) does not match the frozen models '
          'that made the cache')]
  with tf.control_dependencies(checks):
    return tf.identity(x)


def _flat_ids(codes, s: TokenStream, spec: StageSpec):
  return tf.reshape(codes + tf.constant(spec.level_offsets(s.name)), [-1])


@seqio.map_over_dataset(num_seeds=1)
def _crop_and_flatten(ex, seed, *, spec: StageSpec, crop_samples: Optional[int]):
  unit = spec.crop_unit_samples
  codes = {s.name: _stream_codes(ex, s, spec) for s in spec.streams}
  aligned = [s for s in spec.streams if s.time_aligned]
  # Whole crop units every time-aligned stream covers (semantic and codec frames of one clip
  # may cover slightly different lengths when the clip is not whole units long).
  available = tf.reduce_min(tf.stack(
      [tf.shape(codes[s.name])[0] * s.hop_samples // unit for s in aligned]))
  if crop_samples is None:
    offset, length = tf.constant(0, tf.int32), available
  else:
    wanted = crop_samples // unit
    length = tf.minimum(available, wanted)
    if any(s.feature == MELODY_FEATURE for s in spec.streams):
      # Melody tokens describe the clip from its start (stages.tokens.MelodyAudioTokenizer), as
      # the pipeline gives a window the tune from the window's start: crop from the start too.
      offset = tf.constant(0, tf.int32)
    else:
      offset = tf.random.stateless_uniform([], seed, minval=0,
                                           maxval=tf.maximum(available - wanted, 0) + 1,
                                           dtype=tf.int32)
  flat = {}
  for s in spec.streams:
    c = codes[s.name]
    if s.time_aligned:
      per_unit = unit // s.hop_samples
      c = c[offset * per_unit:(offset + length) * per_unit]
    flat[s.name] = _flat_ids(c, s, spec)
  inputs = (tf.concat([flat[s.name] for s in spec.conditions], axis=0) if spec.conditions
            else tf.zeros([0], tf.int32))
  return {'inputs': inputs, 'targets': flat[spec.target.name]}


def stage_examples(dataset, sequence_length=None, *, spec: StageSpec,
                   crop_seconds: Optional[float] = None):
  """Cached stage-token examples -> {'inputs': prefix ids, 'targets': predicted ids} (int32).

  Args:
    dataset: examples of a stage-token cache.
    sequence_length: SeqIO's task feature lengths; 'inputs' and 'targets' must hold the prefix
      and the predicted tokens of the crop (SeqIO would otherwise cut them silently).
    spec: the stage.
    crop_seconds: the crop; None takes it from the 'targets' length (targets / target levels
      frames of the predicted stream), or, without lengths, keeps the whole cached clip.

  Raises:
    ValueError: the crop is not whole frames of every stream, or the lengths cannot hold it (use
      `stage_feature_lengths`).
  """
  lengths = dict(sequence_length or {})
  crop_samples = None
  if crop_seconds is not None:
    crop_samples = spec.crop_samples(crop_seconds)
  elif lengths.get('targets'):
    targets = int(lengths['targets'])
    if targets % spec.period:
      raise ValueError(f"stage {spec.name!r}: task_feature_lengths['targets']={targets} is not a "
                       f'whole number of frames of {spec.period} levels; use '
                       'stage_feature_lengths(spec, crop_seconds)')
    crop_samples = targets // spec.period * spec.target.hop_samples
  if crop_samples is not None:
    seconds = crop_samples / spec.sample_rate
    expected = spec.feature_lengths(seconds)  # raises unless whole frames of every stream
    for key, what in (('inputs', 'prefix'), ('targets', 'predicted')):
      if lengths.get(key) is not None and int(lengths[key]) < expected[key]:
        raise ValueError(f"stage {spec.name!r}: task_feature_lengths['{key}']={lengths[key]} "
                         f'cannot hold the {expected[key]} {what} tokens of a {seconds:g} s '
                         'crop; use stage_feature_lengths(spec, crop_seconds)')
  return _crop_and_flatten(dataset, spec=spec, crop_samples=crop_samples)  # pylint: disable=unexpected-keyword-arg


class CachedTokensSource(seqio.DataSource):
  """A DataSource reading the completed cache of another (stage-token) task.

  The cache is found in SeqIO's global cache directories (DatasetConfig.cache_dir adds one) and
  its provenance is checked first (token_cache.check_cache_provenance): a cache written by other
  frozen models than the tokens task's now raises StaleCacheError, a missing one
  MissingCacheError with the command that writes it.
  """

  def __init__(self, tokens_task: str, splits: Sequence[str]):
    super().__init__(splits=splits, caching_permitted=False)
    self.tokens_task = tokens_task
    self._checked: set[str] = set()

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def _task(self) -> seqio.Task:
    if self.tokens_task not in seqio.TaskRegistry.names():
      raise ValueError(f"stage-token task '{self.tokens_task}' is not registered (import the "
                       'module that registers it, e.g. tasks.stages)')
    return seqio.TaskRegistry.get(self.tokens_task)

  def _checked_task(self, split: str) -> seqio.Task:
    from musiclm_jax.data import token_cache  # pylint: disable=g-import-not-at-top
    task = self._task()
    if split not in self._checked:
      token_cache.check_cache_provenance(self.tokens_task, split=split)
      self._checked.add(split)
    return task

  def list_shards(self, split: str) -> Sequence[str]:
    task = self._checked_task(split)
    return task._get_cached_source(split).list_shards(split)  # pylint: disable=protected-access

  def get_dataset(self, split: str = 'train', shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: Optional[int] = 1):
    del sequence_length, use_cached, num_epochs  # the stage task repeats and crops
    task = self._checked_task(split)
    return task.get_dataset(split=split, use_cached=True, shuffle=shuffle, seed=seed,
                            shard_info=shard_info, num_epochs=1, trim_output_features=False)


_STAGE_TASKS: dict[str, tuple[StageSpec, Optional[float]]] = {}


def stage_task_name(tokens_task: str, spec: StageSpec, crop_seconds: Optional[float] = None
                    ) -> str:
  """'<tokens_task>_<stage>', plus '_<crop in ms>ms' for a fixed crop."""
  name = f'{tokens_task}_{spec.name}'
  return name if crop_seconds is None else f'{name}_{int(round(crop_seconds * 1000))}ms'


def register_stage_task(tokens_task: str, spec: StageSpec, crop_seconds: Optional[float] = None,
                        name: Optional[str] = None,
                        shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE) -> seqio.Task:
  """Registers (once) the task of stage `spec` over the cache of `tokens_task`.

  Args:
    tokens_task: a registered stage-token task (`register_stage_tokens_task`).
    spec: the stage.
    crop_seconds: a fixed crop (the feature lengths may then be longer: packing); None takes the
      crop from the 'targets' feature length.
    name: the task name (default `stage_task_name(tokens_task, spec, crop_seconds)`).
    shuffle_buffer_size: examples in SeqIO's shuffle buffer.

  Returns:
    The task. Registering a name again with the same spec and crop returns it; with others
    raises ValueError.
  """
  name = name or stage_task_name(tokens_task, spec, crop_seconds)
  if crop_seconds is not None:
    spec.crop_samples(crop_seconds)  # raises unless whole frames of every stream
  if name in seqio.TaskRegistry.names():
    if _STAGE_TASKS.get(name) != (spec, crop_seconds):
      raise ValueError(f"task '{name}' is already registered with another stage spec or crop; "
                       'give this one another name\n' + spec.describe())
    return seqio.TaskRegistry.get(name)
  if tokens_task not in seqio.TaskRegistry.names():
    raise ValueError(f"stage-token task '{tokens_task}' is not registered (import the module "
                     'that registers it, e.g. tasks.stages)')
  splits = seqio.TaskRegistry.get(tokens_task).splits
  vocab = seqio.PassThroughVocabulary(spec.vocab_size)
  task = seqio.TaskRegistry.add(
      name, source=CachedTokensSource(tokens_task, splits),
      preprocessors=[functools.partial(stage_examples, spec=spec, crop_seconds=crop_seconds)],
      output_features={k: seqio.Feature(vocab, add_eos=False, dtype=tf.int32)
                       for k in ('inputs', 'targets')},
      shuffle_buffer_size=shuffle_buffer_size)
  _STAGE_TASKS[name] = (spec, crop_seconds)
  logger.info("Registered stage task '%s' over the cache of '%s':\n%s", name, tokens_task,
              spec.describe())
  return task


@gin.configurable
def stage_task(tokens_task: str = gin.REQUIRED, spec: StageSpec = gin.REQUIRED,
               crop_seconds: Optional[float] = None, module: Optional[str] = 'tasks.stages',
               name: Optional[str] = None) -> str:
  """Registers the task of stage `spec` over `tokens_task`'s cache; returns its name (for gin).

  `TRAIN_TASK = @stage_task()` in a run file: the data then use the same gin-configured spec as
  the model.

  Args:
    tokens_task: the stage-token task whose cache the stage reads.
    spec: the stage.
    crop_seconds: the crop (None: from the 'targets' feature length); see `register_stage_task`.
    module: imported first (it registers `tokens_task`); None imports nothing.
    name: the task name (default `stage_task_name(tokens_task, spec, crop_seconds)`).
  """
  if module:
    importlib.import_module(module)
  return register_stage_task(tokens_task, spec, crop_seconds, name).name
