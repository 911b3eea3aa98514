"""What the TFDS audio corpus builders share: the common example schema and the skip report."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

from musiclm_jax.audio.io import SkipCounter
from musiclm_jax.data.model_dir import files_for, recover_replace, replacing

# Every corpus (musiccaps, audio_folder, embedded music) has these fields, so one SeqIO task
# definition reads any of them.
COMMON_FEATURE_NAMES = ('audio', 'caption', 'aspects', 'id')

# Keys of DatasetInfo.metadata written by the builders (see SplitStats.store).
METADATA_KEYS = ('examples', 'skipped', 'skipped_examples', 'warnings', 'empty_splits')


class PcmAudio(tfds.features.Audio):
  """tfds.features.Audio for numpy PCM that honours `encoding`.

  Audio.encode_example passes numpy arrays through without encoding them, so an array cannot be
  stored as raw bytes (Encoding.BYTES / ZLIB) and int16 samples end up as int64 varints of up to
  10 bytes each; this encodes arrays as the Tensor feature does (2 bytes a sample).
  """

  def encode_example(self, audio_or_path_or_fobj):
    if isinstance(audio_or_path_or_fobj, (np.ndarray, list)):
      return tfds.features.Tensor.encode_example(
          self, np.asarray(audio_or_path_or_fobj, self.np_dtype))
    return super().encode_example(audio_or_path_or_fobj)


def pcm_audio(sample_rate: int, num_samples: Optional[int] = None) -> PcmAudio:
  """Mono int16 audio stored as raw PCM bytes; fixed length if num_samples is given."""
  return PcmAudio(shape=(num_samples,), dtype=np.int16, sample_rate=sample_rate,
                  encoding=tfds.features.Encoding.BYTES)


def common_features(sample_rate: int) -> dict[str, Any]:
  """The shared part of the FeaturesDict.

  Args:
    sample_rate: the rate the audio is stored at (the builder resamples to it).

  Returns:
    {'audio': mono int16 of any length, 'caption': text, 'aspects': tags, 'id': unique key}.
  """
  return {
      'audio': pcm_audio(sample_rate),
      'caption': tfds.features.Text(),
      'aspects': tfds.features.Sequence(tfds.features.Text()),
      'id': tfds.features.Text(),
  }


def is_registered(name: str) -> bool:
  """Whether TFDS already has a dataset of this name.

  Re-executing a builder module (importlib.reload, or an import under another module name)
  would register its name twice, which TFDS refuses; builders then skip registration. The
  registry has no public lookup that does not import every TFDS dataset, hence the private one.
  """
  return name in getattr(tfds.core.registered, '_DATASET_REGISTRY', {})


def fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
  """Trims or zero-pads 1-D audio at the end to exactly num_samples."""
  if len(audio) >= num_samples:
    return audio[:num_samples]
  return np.pad(audio, (0, num_samples - len(audio)))


def to_int16(audio: np.ndarray) -> np.ndarray:
  """float audio in [-1, 1] (clipped beyond) to int16 PCM, rounding to nearest."""
  return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def empty_metadata() -> dict[str, Any]:
  return {key: ({} if key != 'empty_splits' else []) for key in METADATA_KEYS}


class SplitStats:
  """Per-split build accounting: examples written, items skipped and items repaired.

  `skips` counts items that produced no example (a missing or bad file, a rejected row), by
  reason; `warnings` counts examples kept with a repair (e.g. an unparsable tag list became
  empty). `store` copies both into the builder's DatasetInfo.metadata, which TFDS saves as
  metadata.json next to the data, so the counts stay readable after the build
  (`skip_report(builder)`).
  """

  def __init__(self, dataset: str, split: str):
    self.split = split
    self.skips = SkipCounter(f'{dataset}/{split}')
    self.warnings = SkipCounter(f'{dataset}/{split} (kept, repaired)')
    self.examples = 0

  def store(self, metadata: dict[str, Any]):
    """Logs the report and records it under the split's name in `metadata`."""
    logging.info('%s: %d examples', self.skips.name, self.examples)
    logging.info(self.skips.report())
    if self.warnings.total:
      logging.info(self.warnings.report())
    for key, value in (('examples', self.examples), ('skipped', self.skips.as_dict()),
                       ('skipped_examples', {r: list(v) for r, v in
                                             sorted(self.skips.examples.items())}),
                       ('warnings', self.warnings.as_dict())):
      metadata.setdefault(key, {})[self.split] = value


def skip_report(builder) -> dict[str, Any]:
  """A plain dict of what a built (or loaded) builder recorded: examples, skips, warnings.

  Returns:
    {'examples': {split: n}, 'skipped': {split: {reason: n}}, 'skipped_examples':
     {split: {reason: [up to 5 items]}}, 'warnings': {split: {reason: n}}, 'empty_splits':
     [splits left out because no audio was found for them], ...}.
  """
  return json.loads(json.dumps(dict(builder.info.metadata)))


def config_name(stem: str, params: Mapping[str, Any]) -> str:
  """A TFDS-valid config name from a readable stem and a hash of the parameters.

  Two builds of the same folder with different parameters get different names, so TFDS does
  not quietly reuse a dataset prepared with other settings.
  """
  stem = re.sub(r'[^A-Za-z0-9_.+-]+', '_', stem).strip('_.') or 'corpus'
  blob = json.dumps({k: _jsonable(v) for k, v in sorted(params.items())}, sort_keys=True)
  return f'{stem[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}'


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def fraction_of(key: str, salt: str = '') -> float:
  """A stable pseudo-random number in [0, 1) for a key (sha256; the same on every machine)."""
  digest = hashlib.sha256((salt + key).encode('utf-8', 'surrogateescape')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0 ** 64


def check_positive(name: str, value: Optional[float], allow_none: bool = False):
  if value is None and allow_none:
    return
  if value is None or not np.isfinite(value) or value <= 0:
    raise ValueError(f'{name} must be a positive number, got {value!r}')


def prepare(make_builder: Callable[[], Any], manual_dir: Optional[str] = None,
            overwrite: bool = False):
  """Builds a TFDS dataset, never losing an existing build to a failed rebuild.

  TFDS's own overwrite modes delete the prepared dataset before generating the new one, so a
  rebuild that fails half-way (a bad folder, an interrupt) leaves nothing. Here the rebuild runs
  inside musiclm_jax.data.model_dir's journaled replace: the old build is moved to a hidden
  sibling (`.VERSION.replace-old`), the new one generated (TFDS writes into an incomplete
  directory and renames it at the end) and fsynced on a local disk, and the old one deleted only
  after that succeeded; on failure it is moved back. A rebuild killed half way is undone by the
  next `prepare` of the same dataset (the old build renamed back, with a warning).

  Args:
    make_builder: makes the builder (called again after moving the old data aside, so the new
      builder does not restore the old DatasetInfo, and after restoring an old build).
    manual_dir: TFDS's manual_dir (user-fetched files), if the builder reads one.
    overwrite: rebuild an existing dataset; False returns an existing one as it is.

  Returns:
    the prepared builder.

  Raises:
    model_dir.InterruptedReplaceError: a rebuild needed, and an earlier interrupted one cannot be
      resolved safely (the message gives the commands that resolve it).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  builder = make_builder()
  config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir),
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  data_dir = os.fspath(builder.data_dir)
  files = files_for(data_dir, tf.io.gfile)
  if recover_replace(data_dir, files) == 'restored':
    builder = make_builder()  # made while the build was away: without its DatasetInfo
  built = tf.io.gfile.exists(os.path.join(data_dir, 'dataset_info.json'))
  if built and not overwrite:
    return builder
  with replacing(data_dir, files):
    builder = make_builder()
    builder.download_and_prepare(download_config=config)
    files.sync_tree(data_dir)
  return builder
