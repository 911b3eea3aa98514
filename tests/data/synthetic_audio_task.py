"""SeqIO tasks over a few deterministic synthetic tones, tokenized by a tiny frozen model.

`synthetic_tones_tokenized`: int16 tones at 24 kHz (some shorter than the clip, some longer) ->
`audio_to_float` -> 0.5 s `random_crop` -> `tokenize_audio` with a random-init
RandomProjectionQuantizer -> CacheDatasetPlaceholder -> `targets` (tokens shifted past PAD and EOS)
for the LM feature converter. `register` adds variants (another init seed, a checkpoint).
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import seqio

from musiclm_jax.data import preprocessors
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.nn.random_projection import RandomProjectionQuantizer
from musiclm_jax.common.tf_setup import quiet_tensorflow

tf = quiet_tensorflow()

TASK = 'synthetic_tones_tokenized'
SAMPLE_RATE = 24000
CLIP_SECONDS = 0.5
CLIP_SAMPLES = int(CLIP_SECONDS * SAMPLE_RATE)
CODEBOOK_SIZE = 64
TOKEN_FEATURE = 'acoustic_tokens'
FIRST_TOKEN = 2  # targets: 0 is padding, 1 is EOS
SPLITS = {'train': 6, 'validation': 3}


def model() -> RandomProjectionQuantizer:
  return RandomProjectionQuantizer(frame_size=960, hop=480, dim=8, codebook_size=CODEBOOK_SIZE)


def tokenizer(init_seed: int = 0, checkpoint_dir: Optional[str] = None,
              step: Optional[int] = None) -> FrozenTokenizer:
  return FrozenTokenizer(model=model(), output_feature=TOKEN_FEATURE, input_samples=CLIP_SAMPLES,
                         checkpoint_dir=checkpoint_dir, step=step, init_seed=init_seed,
                         batch_size=4)


def tones(split: str) -> list[dict[str, object]]:
  """Sine tones (with a second harmonic) of deterministic frequency, level and length."""
  rng = np.random.default_rng({'train': 11, 'validation': 12}[split])
  out = []
  for i in range(SPLITS[split]):
    freq = float(rng.uniform(110, 1760))
    seconds = float(rng.choice([0.3, 0.8, 1.2]))
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.6 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(4 * np.pi * freq * t)
    wave = wave * rng.uniform(0.2, 1.0)
    out.append({'audio': np.round(wave * 32767).astype(np.int16),
                'caption': f'a sine tone at {freq:.0f} Hz'.encode(),
                'aspects': np.array([b'sine', b'synthetic'][:1 + i % 2]),
                'id': f'{split}-{i:03d}'.encode()})
  return out


def _dataset_fn(split, shuffle_files, seed=None):
  del shuffle_files, seed  # one in-memory shard
  examples = tones(split)
  return tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={'audio': tf.TensorSpec([None], tf.int16),
                        'caption': tf.TensorSpec([], tf.string),
                        'aspects': tf.TensorSpec([None], tf.string),
                        'id': tf.TensorSpec([], tf.string)})


@seqio.map_over_dataset
def tokens_to_targets(ex):
  ex = dict(ex)
  ex['targets'] = ex[TOKEN_FEATURE] + FIRST_TOKEN
  return ex


OUTPUT_FEATURES = {
    **preprocessors.AUDIO_FEATURES,
    TOKEN_FEATURE: preprocessors.token_feature(CODEBOOK_SIZE),
    'targets': seqio.Feature(seqio.PassThroughVocabulary(CODEBOOK_SIZE + FIRST_TOKEN, eos_id=1),
                             add_eos=True, dtype=tf.int32),
}


def register(name: str = TASK, tok: Optional[FrozenTokenizer] = None) -> seqio.Task:
  """Registers (once) a synthetic tones task tokenized by `tok` (default: `tokenizer()`)."""
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(_dataset_fn, splits=tuple(SPLITS)),
      preprocessors=[
          preprocessors.audio_to_float,
          functools.partial(preprocessors.random_crop, clip_seconds=CLIP_SECONDS,
                            sample_rate=SAMPLE_RATE),
          functools.partial(preprocessors.tokenize_audio, tokenizer=tok or tokenizer()),
          seqio.CacheDatasetPlaceholder(),
          tokens_to_targets,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=OUTPUT_FEATURES)


register()
