"""Prompts that name one instrument, on a pipeline folder: the eval's 'instrument_prompts' section
alone (musiclm_jax/evaluation/prompts.py), without the rest of the eval.

  .venv/bin/python benchmarks/instrument_prompts.py --pipeline musiclm_jax/pretrained/tiny \
      --classifier runs/tiny/attribute_classifier [--instruments 8] [--seconds 10]

Prints the section as JSON: how often the attribute classifier hears the instrument each prompt
names, beside the chance floor and the classifier on real clips of those instruments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musiclm_jax.evaluation import attributes  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.evaluation import pipeline_eval  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.evaluation import prompts  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.generate.pipeline import Pipeline  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pipeline', required=True)
  parser.add_argument('--classifier', required=True, help='an attribute classifier folder')
  parser.add_argument('--instruments', type=int, default=8)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--split', default='test')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args()
  pipeline = Pipeline.load(args.pipeline)
  classifier = attributes.AttributeClassifier.load(args.classifier)
  clips = pipeline_eval.read_split(pipeline_eval.DEFAULT_DATASET, args.split)
  samples = min([int(args.seconds * pipeline_eval.SAMPLE_RATE)] + [len(a) for a in clips.audio])
  real = np.stack([a[:samples] for a in clips.audio]).astype(np.float32)
  labels = attributes.labels_from_examples(
      clips.examples, {'instrument': classifier.classes['instrument']})['instrument']
  section = prompts.instrument_prompt_section(
      lambda texts: pipeline_eval.generate_audio(pipeline, texts, args.seconds,
                                                 batch_size=args.batch_size, seed=args.seed,
                                                 progress=True),
      classifier, labels, real, instruments=args.instruments)
  print(json.dumps(section, indent=1))


if __name__ == '__main__':
  main()
