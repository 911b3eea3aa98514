"""Does the coarse stage use its conditioning? Teacher-forced loss with it kept, swapped or dropped.

The coarse stage predicts SoundStream levels 1-4 from MuLan tokens and semantic tokens. A stage
that ignores its MuLan tokens cannot follow a prompt, whatever its loss. On the validation
clips of a stage-token cache (the first 2 s windows of each clip, as the eval cuts them), this
scores the pipeline's coarse stage per window-frame bucket (frames counted from the window's
start, 50 a second) with:

  real               each clip's own MuLan and semantic tokens
  shuffled MuLan     another clip's MuLan tokens (a fixed derangement)
  shuffled semantic  another clip's semantic tokens
  (u: the same with every droppable stream set to NULL, the unconditional half of guidance)

The gap between 'shuffled MuLan' and 'real' is what the MuLan tokens are worth to the stage; it
matters most in a window's first frames, which have no acoustic context (at generation the
first frames of a clip fix the timbre the later windows continue).

  .venv/bin/python benchmarks/conditioning_use.py --pipeline runs/tiny/pipeline \
      --cache runs/tiny/stage_tokens

The cache must be the one the pipeline's stages were trained on (its MuLan tokens come from the
pipeline's MuLan conditioner).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from token_baselines import load, seqio  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.evaluation import pipeline_eval  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.generate.pipeline import load_pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.stages.spec import CODEC_FEATURE, MULAN_FEATURE  # noqa: E402  pylint: disable=g-import-not-at-top

BUCKETS = ((0, 3), (3, 10), (10, 30), (30, 10_000))
STAGE = 'coarse'


def bucket_losses(pipeline, tokens, weights, metrics_fn) -> dict[str, tuple[float, float, float]]:
  """{bucket: (loss, unconditional loss, level-1 loss)} over the predicted frames of a bucket."""
  period = pipeline.stages[STAGE].spec.period
  first = np.argmax(weights > 0, axis=1)
  frame = (np.arange(tokens.shape[1])[None] - first[:, None]) // period
  out = {}
  for lo, hi in BUCKETS:
    w = weights * ((frame >= lo) & (frame < hi))
    m = pipeline_eval.teacher_forced_metrics(pipeline, STAGE, tokens, w, batch_size=16,
                                             metrics_fn=metrics_fn)
    name = f'frames {lo}-{hi - 1}' if hi < 10_000 else f'frames {lo}+'
    # A stage with no droppable stream (the tiny coarse stage without MuLan) has no
    # unconditional half: its 'u' is its loss.
    out[name] = (m['loss'], m.get('loss_unconditional', m['loss']), m['loss/level_1'])
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pipeline', required=True)
  parser.add_argument('--cache', required=True, help='the stage-token cache root')
  parser.add_argument('--task', default='embedded_music_melody_stage_tokens')
  args = parser.parse_args()
  seqio.add_global_cache_dirs([args.cache])
  valid = load(args.task, 'validation')
  pipeline = load_pipeline(args.pipeline)
  s = pipeline.stages[STAGE]
  frames = min(ex['codec'].shape[0] for ex in valid)
  codec = np.stack([ex['codec'][:frames] for ex in valid])
  ratio = frames // min(len(ex['semantic']) for ex in valid)
  semantic = np.stack([ex['semantic'][:frames // ratio] for ex in valid])
  mulan = np.stack([ex['mulan'] for ex in valid])
  hop = next(st.hop_samples for st in s.spec.streams if st.feature == CODEC_FEATURE)
  audio = np.zeros((len(valid), frames * hop), np.float32)  # its length only: no melody stream
  derangement = np.roll(np.arange(len(valid)), 7)
  metrics_fn = pipeline_eval.stage_metrics_fn(pipeline, STAGE)
  rows = {}
  settings = [('real', semantic, mulan), ('shuffled MuLan', semantic, mulan[derangement]),
              ('shuffled semantic', semantic[derangement], mulan)]
  if not any(st.feature == MULAN_FEATURE for st in s.spec.conditions):
    print(f'{args.pipeline}: its coarse stage has no MuLan stream; no shuffled-MuLan row')
    settings.pop(1)
  for name, sem, mul in settings:
    tokens, weights = pipeline_eval.stage_sequences(pipeline, STAGE, audio, sem, codec, mul)
    rows[name] = bucket_losses(pipeline, tokens, weights, metrics_fn)
  print(f'{args.pipeline}: coarse stage, {len(valid)} validation clips, teacher-forced loss '
        '(nats; u = unconditional; L1 = level 1)\n')
  buckets = list(next(iter(rows.values())))
  print('| conditioning | ' + ' | '.join(buckets) + ' |')
  print('|---|' + '---:|' * len(buckets))
  for name, row in rows.items():
    cells = [f'{l:.3f} (u {u:.3f}, L1 {l1:.3f})' for l, u, l1 in row.values()]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
