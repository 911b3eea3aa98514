"""Reference points for musicnn FAD on a corpus split: its floor, white noise and silence.

A FAD score means little alone. Three anchors put it on a scale, all against the same half of a
real split, with equal clip counts (FAD depends on the count):
  floor:   the other half of the split (real vs real: the best a generator can expect at this
           size; not 0, because of sampling noise and the 1/N bias);
  noise:   white Gaussian noise with each real clip's RMS and length;
  silence: digital silence of the same lengths.

python -m musiclm_jax.evaluation.fad_baselines [--config default] [--split test]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

import numpy as np

from musiclm_jax.evaluation import frechet
from musiclm_jax.evaluation import musicnn


def read_corpus_audio(config: str = 'default', split: str = 'test',
                      data_dir: Optional[str] = None,
                      max_clips: Optional[int] = None) -> list[np.ndarray]:
  """The int16 clips of an embedded_music split (tfds; the dataset must be built)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Registers the dataset with TFDS.
  from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  ds = tfds.load(f'embedded_music/{config}', split=split, data_dir=data_dir)
  clips = []
  for example in tfds.as_numpy(ds):
    clips.append(np.asarray(example['audio']))
    if max_clips is not None and len(clips) >= max_clips:
      break
  return clips


def fad_baselines(clips: Sequence[np.ndarray], embedder: musicnn.MusicnnEmbedder,
                  seed: int = 0) -> dict[str, float]:
  """musicnn FAD of half a set of real clips against the other half, noise and silence.

  Args:
    clips: real clips at embedder.input_sample_rate (at least 4; int16 or float).
    embedder: the embedding (e.g. MusicnnEmbedder()).
    seed: seeds the split into halves and the noise.

  Returns:
    'floor', 'noise', 'silence' FADs and 'clips_per_set'.
  """
  if len(clips) < 4:
    raise ValueError(f'{len(clips)} clips; the halves need at least 2 each')
  rng = np.random.default_rng(seed)
  floats = [musicnn.to_float_mono(c, f'clip {i}') for i, c in enumerate(clips)]
  order = rng.permutation(len(floats))
  half = len(floats) // 2
  first = [floats[i] for i in order[:half]]
  second = [floats[i] for i in order[half:2 * half]]
  noise = [(rng.standard_normal(c.shape[0]) * np.sqrt(np.mean(c.astype(np.float64) ** 2)))
           .astype(np.float32) for c in first]
  silence = [np.zeros_like(c) for c in first]
  reference = embedder.embed(first)
  return {
      'clips_per_set': half,
      'floor': frechet.fad(reference, embedder.embed(second)),
      'noise': frechet.fad(reference, embedder.embed(noise)),
      'silence': frechet.fad(reference, embedder.embed(silence)),
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m musiclm_jax.evaluation.fad_baselines',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='default', help='embedded_music config')
  parser.add_argument('--split', default='test')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir (default: ~/tensorflow_datasets)')
  parser.add_argument('--max_clips', type=int, default=None)
  parser.add_argument('--model', default='MTT_musicnn', choices=musicnn.MODELS)
  parser.add_argument('--feature', default='penultimate', choices=musicnn.FEATURES)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  start = time.time()
  clips = read_corpus_audio(args.config, args.split, args.data_dir, args.max_clips)
  embedder = musicnn.MusicnnEmbedder(model=args.model, feature=args.feature)
  result = fad_baselines(clips, embedder, seed=args.seed)
  result.update(config=args.config, split=args.split, model=args.model, feature=args.feature,
                seconds=round(time.time() - start, 1))
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
