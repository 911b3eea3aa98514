"""`musiclm-jax build_data`: prepares one of the audio corpora as a TFDS dataset and reports it."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import gin
import numpy as np

from musiclm_jax.common import atomic

DATASETS = ('embedded_music', 'musiccaps', 'audio_folder')


class BuildError(ValueError):
  """A dataset that cannot be built as asked (unknown name, missing folder)."""


def _expand(path: Optional[str]) -> Optional[str]:
  return None if path is None else os.path.abspath(os.path.expanduser(os.fspath(path)))


@gin.configurable
def build_dataset(name: str = gin.REQUIRED,
                  data_dir: Optional[str] = None,
                  manual_dir: Optional[str] = None,
                  config: Optional[Mapping[str, Any]] = None,
                  overwrite: bool = False,
                  summary_file: Optional[str] = None,
                  preview_dir: Optional[str] = None) -> dict[str, Any]:
  """Prepares a corpus as a TFDS dataset (once; a prepared one is reused) and summarises it.

  Args:
    name: 'embedded_music/<config>' (configs: tiny, default, default_with_essen), 'musiccaps'
      or 'audio_folder'.
    data_dir: the TFDS data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: musiccaps: the folder with musiccaps-public.csv and the clips you fetched;
      audio_folder: your folder of music.
    config: builder config fields for musiccaps / audio_folder (e.g. {'clip_seconds': 10.0,
      'hop_seconds': 5.0, 'validation_fraction': 0.05}); 'name' picks the config name.
    overwrite: rebuild an existing dataset (the old one is kept until the new one is complete).
    summary_file: also write the summary as JSON here.
    preview_dir: also write a few examples there as wav files and `preview.png` (log-mels with
      their captions), to look at and listen to what was built.

  Returns:
    {'tfds_name', 'data_dir', 'splits': {split: {'examples', 'hours'}}, 'hours', 'bytes',
     'skipped': {split: {reason: count}}, 'warnings': {...}}.
  """
  from musiclm_jax.data import builder_utils  # pylint: disable=g-import-not-at-top
  config = dict(config or {})
  data_dir = _expand(data_dir)
  manual_dir = _expand(manual_dir)
  family = name.split('/')[0].split(':')[0]
  if family not in DATASETS:
    raise BuildError(f'build_dataset.name={name!r}: unknown dataset; one of {DATASETS}')
  if family == 'embedded_music':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    if config:
      raise BuildError('build_dataset.config: embedded_music takes its size from the config name '
                       f'(e.g. embedded_music/tiny), got {config}')
    builder = builder_utils.prepare(lambda: tfds.builder(name, data_dir=data_dir),
                                    overwrite=overwrite)
  else:
    if manual_dir is None or not os.path.isdir(manual_dir):
      raise BuildError(f'build_dataset.manual_dir={manual_dir!r}: {family} needs an existing '
                       'folder (see the module docstring of musiclm_jax/data/'
                       f'{family}.py for its layout)')
    if family == 'musiccaps':
      from musiclm_jax.data import musiccaps  # pylint: disable=g-import-not-at-top
      builder, _ = musiccaps.build_musiccaps(manual_dir, data_dir, overwrite=overwrite,
                                             **config)
    else:
      from musiclm_jax.data import audio_folder  # pylint: disable=g-import-not-at-top
      builder, _ = audio_folder.build_audio_folder(manual_dir, data_dir, overwrite=overwrite,
                                                   **config)
  summary = summarize(builder)
  print(format_summary(summary))
  if summary_file:
    atomic.write_json(_expand(summary_file), summary, durable=True)
  if preview_dir:
    from musiclm_jax.data import preview  # pylint: disable=g-import-not-at-top
    png = preview.write_preview(builder, _expand(preview_dir))
    print(f'preview: {png} (and the examples as wav files beside it)')
  return summary


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def summarize(builder) -> dict[str, Any]:
  """Examples and hours of audio per split, bytes on disk and the builder's skip counts."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import builder_utils  # pylint: disable=g-import-not-at-top
  rate = builder.info.features['audio'].sample_rate
  splits = {}
  for split in sorted(builder.info.splits.keys()):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: tf.shape(ex['audio'])[0], num_parallel_calls=tf.data.AUTOTUNE)
    samples = int(np.sum(list(ds.as_numpy_iterator()), dtype=np.int64))
    splits[split] = {'examples': int(builder.info.splits[split].num_examples),
                     'hours': samples / rate / 3600.0}
  report = builder_utils.skip_report(builder)
  skipped = report.get('skipped') or {}
  if not skipped and report.get('skip_counts'):
    skipped = {'melodies': report['skip_counts']}  # embedded_music skips before splitting
  config_name = builder.builder_config.name if builder.builder_config else None
  return {
      'tfds_name': f'{builder.name}/{config_name}:{builder.version}' if config_name
                   else f'{builder.name}:{builder.version}',
      'data_dir': builder.data_dir,
      'splits': splits,
      'examples': sum(s['examples'] for s in splits.values()),
      'hours': sum(s['hours'] for s in splits.values()),
      'bytes': _dir_bytes(builder.data_dir),
      'skipped': skipped,
      'warnings': report.get('warnings', {}),
  }


def format_summary(summary: Mapping[str, Any]) -> str:
  """A small table: one row per split, then totals and skip counts."""
  lines = [f'{summary["tfds_name"]} in {summary["data_dir"]}',
           f'{"split":<16}{"examples":>10}{"hours":>10}']
  for split, s in summary['splits'].items():
    lines.append(f'{split:<16}{s["examples"]:>10}{s["hours"]:>10.3f}')
  lines.append(f'{"total":<16}{summary["examples"]:>10}{summary["hours"]:>10.3f}'
               f'   ({summary["bytes"] / 2**20:.1f} MiB on disk)')
  for kind in ('skipped', 'warnings'):
    counts = {split: c for split, c in summary.get(kind, {}).items() if c}
    if counts:
      lines.append(f'{kind}: ' + '; '.join(
          f'{split}: ' + ', '.join(f'{r} {n}' for r, n in sorted(c.items()))
          for split, c in sorted(counts.items())))
  return '\n'.join(lines)
