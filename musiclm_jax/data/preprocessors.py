"""SeqIO conventions and preprocessors for audio tasks: features, crops, resampling, tokenizing.

Audio tasks' sources yield examples with `audio` (int16, 24 kHz, mono), `caption` (string),
`aspects` (strings) and `id` (string). A task converts the audio to float with `audio_to_float`,
crops it to the model's clip length with `random_crop`, may `resample` it for a model with another
rate, and adds tokens with `tokenize_audio` before a `seqio.CacheDatasetPlaceholder()`, so that
`musiclm-jax tokenize` can cache the tokens (musiclm_jax/data/token_cache.py):

  seqio.TaskRegistry.add(
      'my_task', source=..., output_features={**AUDIO_FEATURES,
                                              'acoustic_tokens': token_feature(1024)},
      preprocessors=[audio_to_float,
                     functools.partial(random_crop, clip_seconds=10.0),
                     functools.partial(tokenize_audio, tokenizer=my_frozen_tokenizer),
                     seqio.CacheDatasetPlaceholder(), ...])
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import seqio

from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.common.tf_setup import quiet_tensorflow

tf = quiet_tensorflow()

SAMPLE_RATE = 24000


def _side_feature(dtype, rank: int) -> seqio.Feature:
  # Not a token sequence: no vocabulary to speak of, no EOS, and optional so that a task may drop
  # it (e.g. keep only tokens in a cache).
  return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, required=False,
                       dtype=dtype, rank=rank)


# The canonical output features of audio tasks (after `audio_to_float`): seqio validates each
# feature's dtype and rank, and feature converters ignore the ones they do not consume.
AUDIO_FEATURES = {
    'audio': _side_feature(tf.float32, 1),    # samples in [-1, 1), SAMPLE_RATE, mono
    'caption': _side_feature(tf.string, 0),
    'aspects': _side_feature(tf.string, 1),
    'id': _side_feature(tf.string, 0),
}


def token_feature(vocab_size: int, rank: int = 1, required: bool = True) -> seqio.Feature:
  """The output feature of a tokenizer's int32 tokens: rank 1 [frames] or 2 [frames, levels]."""
  return seqio.Feature(seqio.PassThroughVocabulary(vocab_size), add_eos=False, required=required,
                       dtype=tf.int32, rank=rank)


def _clip_length(clip_samples: Optional[int], clip_seconds: Optional[float],
                 sample_rate: int) -> int:
  if (clip_samples is None) == (clip_seconds is None):
    raise ValueError('give exactly one of clip_samples and clip_seconds')
  n = int(clip_samples) if clip_samples is not None else int(round(clip_seconds * sample_rate))
  if n < 1:
    raise ValueError(f'clip length must be at least one sample, got {n}')
  return n


@seqio.map_over_dataset
def audio_to_float(ex, feature: str = 'audio'):
  """int16 samples -> float32 in [-1, 1) (x / 32768); float audio is only cast to float32."""
  ex = dict(ex)
  x = ex[feature]
  if x.dtype == tf.int16:
    ex[feature] = tf.cast(x, tf.float32) / 32768.0
  elif x.dtype.is_floating:
    ex[feature] = tf.cast(x, tf.float32)
  else:
    raise TypeError(f'audio_to_float: feature {feature!r} is {x.dtype.name}, expected int16 or '
                    'float')
  return ex


@seqio.map_over_dataset(num_seeds=1)
def random_crop(ex, seed, *, clip_samples: Optional[int] = None,
                clip_seconds: Optional[float] = None, sample_rate: int = SAMPLE_RATE,
                feature: str = 'audio', pad_short: bool = True):
  """Crops a rank-1 audio feature to a model's clip length at a uniformly random offset.

  The offset comes from a stateless RNG on seqio's per-example seed, so a task read with a given
  seed (and the Beam cache, which seeds each source shard) crops the same way every time.

  Args:
    ex: the example.
    seed: seqio's per-example seed (passed by `map_over_dataset`).
    clip_samples: the clip length in samples; or
    clip_seconds: the clip length in seconds (at `sample_rate`).
    sample_rate: the audio's sample rate.
    feature: the audio feature.
    pad_short: zero-pad clips shorter than the clip length at the end, so every example has the
      same length (what batching and `tokenize_audio` need); otherwise short clips stay as they
      are.

  Returns:
    The example with the cropped audio (static length when `pad_short`).
  """
  n = _clip_length(clip_samples, clip_seconds, sample_rate)
  ex = dict(ex)
  x = ex[feature]
  length = tf.shape(x)[0]
  # maxval is exclusive; a clip no longer than n has the single offset 0.
  offset = tf.random.stateless_uniform([], seed, minval=0,
                                       maxval=tf.maximum(length - n, 0) + 1, dtype=tf.int32)
  x = x[offset:offset + n]
  if pad_short:
    x = tf.pad(x, [[0, n - tf.shape(x)[0]]])
    x = tf.ensure_shape(x, [n])
  ex[feature] = x
  return ex



def crop_to_sequence_length(dataset, sequence_length=None, *, feature: str = 'audio'):
  """`random_crop` to `sequence_length[feature]` samples: the model picks its clip length.

  SeqIO passes the task feature lengths (DatasetConfig.task_feature_lengths, e.g.
  {'audio': 240000} for 10 s at 24 kHz) to preprocessors that take `sequence_length`, so one
  registered audio task serves models with different clip lengths. Without a length for
  `feature` the audio is left whole.
  """
  n = (sequence_length or {}).get(feature)
  if n is None:
    return dataset
  return random_crop(dataset, clip_samples=int(n), feature=feature)  # pylint: disable=unexpected-keyword-arg

def _resample_numpy(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
  try:
    from musiclm_jax.audio import io as audio_io  # pylint: disable=g-import-not-at-top
  except ImportError:
    audio_io = None
  if audio_io is not None and hasattr(audio_io, 'resample'):
    return np.asarray(audio_io.resample(x, from_rate, to_rate), np.float32)
  import soxr  # pylint: disable=g-import-not-at-top
  return soxr.resample(np.asarray(x, np.float32), from_rate, to_rate,
                       quality='HQ').astype(np.float32)


def resample(dataset, *, from_rate: int, to_rate: int, feature: str = 'audio'):
  """Band-limited resampling of a rank-1 float audio feature (soxr 'HQ').

  Uses `musiclm_jax.audio.io.resample` (the library's one resampler), run as a numpy function.
  The output has round(len * to_rate / from_rate) samples.

  Args:
    dataset: examples with a float `feature` (apply `audio_to_float` first).
    from_rate: the audio's sample rate.
    to_rate: the wanted sample rate.
    feature: the audio feature.
  """
  if from_rate == to_rate:
    return dataset

  def fn(ex):
    ex = dict(ex)
    y = tf.numpy_function(lambda x: _resample_numpy(x, from_rate, to_rate),
                          [tf.cast(ex[feature], tf.float32)], tf.float32, stateful=False)
    y.set_shape([None])
    ex[feature] = y
    return ex

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def tokenize_audio(dataset, *, tokenizer: FrozenTokenizer, keep_input: bool = True):
  """Adds a frozen tokenizer's tokens (`tokenizer.output_feature`, int32) to every example.

  Examples are batched `tokenizer.batch_size` at a time so the model runs on batches (inside
  the tf.data pipeline, as a numpy function), then unbatched again in the same order. Features
  of variable length (e.g. `aspects`) pass through untouched.

  Args:
    dataset: examples whose `tokenizer.input_feature` is float32 audio of at most
      `tokenizer.input_samples` samples (crop with `random_crop` first); shorter audio is
      zero-padded at the end to that length.
    tokenizer: the frozen model.
    keep_input: keep the audio in the examples (drop it to cache only tokens).

  Returns:
    The dataset with the token feature added.
  """
  name_in, name_out = tokenizer.input_feature, tokenizer.output_feature
  n = tokenizer.input_samples
  out_spec = tokenizer.output_spec()
  specs_before = dataset.element_spec

  def fit(ex):
    ex = dict(ex)
    x = tf.cast(ex[name_in], tf.float32)
    check = tf.debugging.assert_less_equal(
        tf.shape(x)[0], n, message=f'tokenize_audio: {name_in!r} is longer than the tokenizer\'s '
        f'input_samples={n}; crop it first (random_crop)')
    with tf.control_dependencies([check]):
      x = tf.pad(x, [[0, n - tf.shape(x)[0]]])
    ex[name_in] = tf.ensure_shape(x, [n])
    return ex

  def run(batch):
    batch = dict(batch)
    tokens = tf.numpy_function(tokenizer, [batch[name_in]], tf.int32, stateful=False)
    tokens.set_shape([None] + list(out_spec.shape))
    batch[name_out] = tokens
    if not keep_input:
      del batch[name_in]
    return batch

  def densify(ex):
    # ragged_batch + unbatch turns a variable-length dense feature into a ragged-rank-0
    # RaggedTensor spec: give every feature back the kind of spec it had.
    out = {}
    for k, v in ex.items():
      if isinstance(v, tf.RaggedTensor) and not isinstance(specs_before.get(k),
                                                            tf.RaggedTensorSpec):
        v = v.to_tensor()
      out[k] = v
    return out

  ds = dataset.map(fit, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ragged_batch(tokenizer.batch_size)
  # One model call at a time: the model uses the whole device (or all cores) by itself.
  ds = ds.map(run)
  return ds.unbatch().map(densify)
