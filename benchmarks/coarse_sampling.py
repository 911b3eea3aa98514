"""Coarse-stage sampling settings, given the true semantic tokens: do they move the weak step?

The eval ladder (`musiclm-jax eval`) can show the coarse stage as the step where the quality falls
("ground-truth semantic" row). Before retraining, this asks whether sampling settings alone
help: on the first N clips of the embedded corpus's test split, each row generates the coarse and
fine levels from the clips' true semantic tokens (batch b seeded like the eval) with one setting
changed, and scores the audio against the real clips: multi-scale mel distance (lower is
better) and how often the attribute classifier's prediction on the generated clip agrees with its
prediction on the real one (instrument, tempo, drums, dynamics).

  .venv/bin/python benchmarks/coarse_sampling.py --pipeline runs/tiny/pipeline \
      --classifier runs/tiny/attribute_classifier [--num_clips 16] [--out runs/ablate/coarse_sampling.json]
      [--only defaults guidance]                  # rows whose names contain these

Needs the built corpus (`musiclm-jax build_data`) and a fitted attribute classifier. N = 16 is a
quick look (the agreement moves in steps of 1/16): treat differences under ~0.1 as noise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musiclm_jax.common import atomic
from musiclm_jax.evaluation import attributes
from musiclm_jax.evaluation import pipeline_eval
from musiclm_jax.generate.pipeline import Pipeline

ROWS = (
    ('pipeline defaults', None),
    ('coarse temperature 0.7', {'temperatures': {'coarse': 0.7}}),
    ('coarse temperature 0.5', {'temperatures': {'coarse': 0.5}}),
    ('coarse top-k 50', {'top_k': {'coarse': 50}}),
    ('no guidance (scale 1)', {'guidance_scale': 1.0}),
    ('guidance 2', {'guidance_scale': 2.0}),
)
ATTRIBUTES = ('instrument', 'tempo', 'drums', 'dynamics')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pipeline', required=True, help='a pipeline folder')
  parser.add_argument('--classifier', required=True, help='an attribute classifier folder')
  parser.add_argument('--num_clips', type=int, default=16)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--out', default=None, help='write the rows as JSON here')
  parser.add_argument('--only', nargs='*', default=None,
                      help='run only the rows whose names contain one of these strings')
  args = parser.parse_args(argv)

  pipeline = Pipeline.load(args.pipeline)
  clips = pipeline_eval.read_split('embedded_music/default', 'test').select(range(args.num_clips))
  rate = pipeline.sample_rate
  samples = int(args.seconds * rate) // pipeline.unit_samples * pipeline.unit_samples
  real = np.stack([a[:samples] for a in clips.audio]).astype(np.float32)
  semantic, _ = pipeline_eval.tokenize_clips(pipeline, real, args.batch_size)
  classifier = attributes.AttributeClassifier.load(args.classifier)
  reference = classifier.predict(real, rate)
  rows = {}
  print(f'{args.num_clips} test clips of {samples / rate:g} s, true semantic tokens, '
        f'coarse + fine generated')
  print(f'{"setting":<26} {"mel distance":>12} ' + ' '.join(f'{a:>10}' for a in ATTRIBUTES)
        + f' {"s":>6}')
  for name, sampling in ROWS:
    if args.only is not None and not any(k in name for k in args.only):
      continue
    start = time.perf_counter()
    audio = pipeline_eval.generate_audio(
        pipeline, list(clips.captions), samples / rate, batch_size=args.batch_size,
        ground_truth={'semantic_tokens': semantic}, sampling=sampling)
    mel = pipeline_eval.mel_distance_and_snr(real, audio, args.batch_size)['mel_distance']
    predicted = classifier.predict(audio, rate)
    agree = {a: float(np.mean(predicted[a] == reference[a])) for a in ATTRIBUTES}
    seconds = time.perf_counter() - start
    rows[name] = {'sampling': sampling, 'mel_distance': float(mel), 'agreement': agree,
                  'seconds': seconds}
    print(f'{name:<26} {mel:>12.3f} ' + ' '.join(f'{agree[a]:>10.3f}' for a in ATTRIBUTES)
          + f' {seconds:>6.0f}', flush=True)
  if args.out:
    atomic.write_json(args.out, {'pipeline': args.pipeline, 'num_clips': args.num_clips,
                                 'rows': rows})
  return 0


if __name__ == '__main__':
  sys.exit(main())
