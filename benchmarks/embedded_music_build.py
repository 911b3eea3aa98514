"""Times a build of the embedded corpus (TFDS `embedded_music`) in one config (a record).

  .venv/bin/python benchmarks/embedded_music_build.py [--config default] [--data_dir DIR]

Builds the config from scratch into DATA_DIR (regenerating it if already there; a temporary
directory, removed afterwards, when none is given) and prints one table: examples per split,
hours of audio, bytes on disk, build seconds, and the tunes skipped and why.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes_under(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def build(config: str, data_dir: str) -> dict:
  """Builds embedded_music/CONFIG into data_dir and returns what the table reports."""
  sys.path.insert(0, REPO)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Importing the package registers the builder.
  import musiclm_jax.data.embedded_music  # pylint: disable=g-import-not-at-top,unused-import

  tfds.disable_progress_bar()
  builder = tfds.builder(f'embedded_music/{config}', data_dir=data_dir)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
  seconds = time.perf_counter() - start
  cfg = builder.builder_config
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  return {
      'config': config,
      'splits': splits,
      'examples': sum(splits.values()),
      'hours': sum(splits.values()) * cfg.clip_seconds / 3600.0,
      'bytes': _bytes_under(builder.data_dir),
      'seconds': seconds,
      'skips': dict(builder.info.metadata['skip_counts']),
      'tunes_tried': builder.info.metadata['tunes_tried'],
  }


def main_():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--config', default='default', help='tiny, default or default_with_essen')
  parser.add_argument('--data_dir', default=None, help='where to build (default: a temp dir)')
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  if args.data_dir:
    r = build(args.config, args.data_dir)
  else:
    with tempfile.TemporaryDirectory() as data_dir:
      r = build(args.config, data_dir)
  split_text = ' '.join(f'{k}={v}' for k, v in sorted(r['splits'].items()))
  print(f'embedded_music/{r["config"]} build ({os.cpu_count()} CPUs); splits: {split_text}')
  print(f'{"examples":>9} {"hours":>7} {"MB on disk":>11} {"build s":>8} {"tunes tried":>12}  '
        f'skipped')
  print(f'{r["examples"]:>9} {r["hours"]:>7.2f} {r["bytes"] / 1e6:>11.1f} {r["seconds"]:>8.1f} '
        f'{r["tunes_tried"]:>12}  {r["skips"] or "none"}')


if __name__ == '__main__':
  main_()
