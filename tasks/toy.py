"""Synthetic token tasks for exercising the trainer before the audio models exist.

`toy_copy`: random tokens, a separator, then the same tokens again: the second half is
predictable only by attending back, so the loss falls well below log(vocab) when the model works.
`toy_count`: a random start, then counting up by one (learnable by a single layer).
Generated in code from a fixed seed per split: identical on every machine, no files.
"""
import functools

import numpy as np
import seqio

from musiclm_jax.common.tf_setup import quiet_tensorflow

tf = quiet_tensorflow()

VOCAB_SIZE = 64
PAD, EOS, SEP = 0, 1, 2
FIRST_TOKEN = 3
MAX_HALF_LENGTH = 15
SPLIT_SIZES = {'train': 4096, 'validation': 256}
SPLIT_SEEDS = {'train': 1234, 'validation': 5678}
VOCABULARY = seqio.PassThroughVocabulary(size=VOCAB_SIZE, eos_id=EOS)
OUTPUT_FEATURES = {'targets': seqio.Feature(VOCABULARY, add_eos=True, dtype=tf.int32)}


def copy_sequences(split: str) -> list[np.ndarray]:
  """x, SEP, x with x of random length 4..MAX_HALF_LENGTH over tokens FIRST_TOKEN..VOCAB-1."""
  rng = np.random.default_rng(SPLIT_SEEDS[split])
  out = []
  for _ in range(SPLIT_SIZES[split]):
    x = rng.integers(FIRST_TOKEN, VOCAB_SIZE, size=rng.integers(4, MAX_HALF_LENGTH + 1))
    out.append(np.concatenate([x, [SEP], x]).astype(np.int32))
  return out


def count_sequences(split: str) -> list[np.ndarray]:
  """start, start+1, ... (length 8..2*MAX_HALF_LENGTH), wrapping within the token range."""
  rng = np.random.default_rng(SPLIT_SEEDS[split] + 1)
  span = VOCAB_SIZE - FIRST_TOKEN
  out = []
  for _ in range(SPLIT_SIZES[split]):
    start = rng.integers(0, span)
    n = rng.integers(8, 2 * MAX_HALF_LENGTH + 1)
    out.append((FIRST_TOKEN + (start + np.arange(n)) % span).astype(np.int32))
  return out


def _dataset_fn(split, shuffle_files, seed=None, *, make):
  del shuffle_files, seed  # one in-memory shard; SeqIO's example shuffle does the shuffling
  seqs = make(split)
  lengths = np.array([len(s) for s in seqs], np.int32)
  padded = np.zeros((len(seqs), lengths.max()), np.int32)
  for i, s in enumerate(seqs):
    padded[i, :len(s)] = s
  ds = tf.data.Dataset.from_tensor_slices({'tokens': padded, 'length': lengths})
  return ds.map(lambda ex: {'targets': ex['tokens'][:ex['length']]},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


for _name, _make in (('toy_copy', copy_sequences), ('toy_count', count_sequences)):
  if _name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        _name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, make=_make), splits=tuple(SPLIT_SIZES)),
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
        output_features=OUTPUT_FEATURES)
