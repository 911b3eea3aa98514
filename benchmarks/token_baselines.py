"""Count-model baselines for the stage LMs: what a table of counts predicts on validation.

A stage LM's teacher-forced loss means little alone. This fits smoothed count tables on the
train split of a stage-token cache and scores them on the validation split (cross entropy in
nats, the same unit as the stages' `loss/level_N`), per RVQ level of the predicted streams:

  unigram                    p(code)
  instrument                 p(code | the clip's first instrument label)
  mulan token                p(code | the clip's first MuLan token)
  aligned semantic           p(code | the semantic token over the same instant)
  previous frame             p(code | the same level's code one frame earlier)
  previous frame + semantic  p(code | both)
  level below                p(code | the code one level lower in the same frame)

Each table is backed off to the unigram (add-alpha toward the unigram, alpha = 0.5 per code).
A stage LM that scores worse than one of these rows has not learnt what a table of counts
learns from the same clips: it is undertrained, not short of information.

  .venv/bin/python benchmarks/token_baselines.py --cache runs/tiny/stage_tokens \
      [--task embedded_music_melody_stage_tokens] [--levels 4] [--json out.json]

Reads only the cache (no model). Prints one Markdown table per stream.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musiclm_jax.common import tf_setup  # noqa: E402  pylint: disable=g-import-not-at-top

tf_setup.quiet_tensorflow()

import seqio  # noqa: E402  pylint: disable=g-import-not-at-top

import tasks.stages  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import

ALPHA = 0.5


def load(task: str, split: str) -> list[dict[str, np.ndarray]]:
  """The cached examples of `split`: codec [frames, levels], semantic [T], mulan [L], instrument."""
  ds = seqio.get_mixture_or_task(task).get_dataset(
      split=split, use_cached=True, shuffle=False, num_epochs=1, trim_output_features=False)
  out = []
  for ex in ds.as_numpy_iterator():
    instruments = [x.decode() for x in np.atleast_1d(ex.get('instruments', []))]
    out.append({'codec': np.asarray(ex['codec_tokens']).reshape(-1, ex['codec_tokens'].shape[-1]),
                'semantic': np.asarray(ex['semantic_tokens']).reshape(-1),
                'mulan': np.asarray(ex['mulan_tokens']).reshape(-1),
                'instrument': instruments[0] if instruments else ''})
  return out


def cross_entropy(cond_train, y_train, cond_valid, y_valid, codes: int) -> float:
  """Validation nats of p(y | cond) counted on train, add-alpha backed off to the unigram."""
  keys = {k: i for i, k in enumerate(np.unique(np.concatenate([cond_train, cond_valid])))}
  ci = np.array([keys[k] for k in cond_train])
  cv = np.array([keys[k] for k in cond_valid])
  table = np.zeros((len(keys), codes))
  np.add.at(table, (ci, y_train), 1.0)
  unigram = np.bincount(y_train, minlength=codes) + ALPHA
  unigram = unigram / unigram.sum()
  probs = (table[cv, y_valid] + ALPHA * codes * unigram[y_valid]) / (
      table[cv].sum(-1) + ALPHA * codes)
  return float(-np.mean(np.log(probs)))


def conditions(ex: dict[str, np.ndarray], level: int, instruments: dict[str, int]
               ) -> dict[str, np.ndarray]:
  """Per-frame condition ids of one clip for the codec level `level` (0-based)."""
  codec = ex['codec']
  frames, levels = codec.shape
  semantic = ex['semantic']
  aligned = semantic[np.minimum((np.arange(frames) * len(semantic)) // frames,
                                len(semantic) - 1)]
  previous = np.concatenate([[-1], codec[:-1, level]])
  out = {
      'unigram': np.zeros(frames, np.int64),
      'instrument': np.full(frames, instruments[ex['instrument']]),
      'mulan token': np.full(frames, ex['mulan'][0]),
      'aligned semantic': aligned,
      'previous frame': previous,
      'previous frame + semantic': (previous + 1) * 100_000 + aligned,
  }
  if level > 0:
    out['level below'] = codec[:, level - 1]
  del levels
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cache', required=True, help='the cache root given to `tokenize`')
  parser.add_argument('--task', default='embedded_music_melody_stage_tokens')
  parser.add_argument('--levels', type=int, default=4, help='codec levels scored (from 1)')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  seqio.add_global_cache_dirs([args.cache])
  train, valid = load(args.task, 'train'), load(args.task, 'validation')
  codes = int(max(ex['codec'].max() for ex in train + valid)) + 1
  instruments = {k: i for i, k in enumerate(sorted({ex['instrument'] for ex in train + valid}))}
  print(f'{args.task}: {len(train)} train / {len(valid)} validation clips, '
        f'{train[0]["codec"].shape[0]} codec frames a clip, {codes} codes a level\n')
  results = collections.OrderedDict()
  for level in range(args.levels):
    tr = [conditions(ex, level, instruments) for ex in train]
    va = [conditions(ex, level, instruments) for ex in valid]
    y_tr = np.concatenate([ex['codec'][:, level] for ex in train])
    y_va = np.concatenate([ex['codec'][:, level] for ex in valid])
    row = {}
    for name in tr[0]:
      row[name] = cross_entropy(np.concatenate([c[name] for c in tr]), y_tr,
                                np.concatenate([c[name] for c in va]), y_va, codes)
    results[f'codec level {level + 1}'] = row
  names = list(dict.fromkeys(n for row in results.values() for n in row))
  print('| baseline (validation nats) | ' + ' | '.join(results) + ' |')
  print('|---|' + '---:|' * len(results))
  for name in names:
    cells = [f'{row[name]:.3f}' if name in row else '' for row in results.values()]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  print(f'| uniform | ' + ' | '.join([f'{np.log(codes):.3f}'] * len(results)) + ' |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
