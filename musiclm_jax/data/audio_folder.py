"""A folder of your own music as a TFDS dataset of fixed-length crops, with optional captions.

Layout (the folder is TFDS's manual_dir, or AudioFolderConfig.root):

  my_music/
    song.wav                     # any depth; .wav .flac .ogg .opus .mp3 .aif(f) (and .m4a
    album/track01.flac           # when a decoder for it is installed; else 'unreadable')
    captions.csv                 # optional: columns file,caption,tags
    captions.jsonl               # optional: {"file": ..., "caption": ..., "tags": [...]}

`file` in a captions file is the path relative to the folder ('album/track01.flac'). csv tags
are separated by ';' (or by ',' when there is no ';'); jsonl tags are a list of strings (or
such a separated string). An entry that is absolute or climbs out of the folder ('..') is
counted as 'outside_root' and ignored; one naming no audio file found is counted as
'not_found'; a malformed one as 'bad_entry'; a second entry for the same file as
'duplicate_entry' (the first wins; captions.csv is read before captions.jsonl). Files with no
caption get an empty caption (counted as the warning 'no_caption'), or with
caption_from_filename=True one made from the file name ('my_song-live.wav' -> 'my song live').
Hidden files and folders (a leading '.') are ignored.

Every file is cut into crops of clip_seconds every hop_seconds, read window by window (never a
whole long file at once), resampled to `sample_rate` mono int16. Crops are exactly
clip_seconds long except one last partial crop, kept when it adds at least min_seconds of
audio not in the previous crop; a file shorter than clip_seconds is one crop of its own length
if it is at least min_seconds long ('too_short' otherwise). A crop that is silent is dropped
('silent_crop'; a file with no crop left at all counts once as 'silent'). A file whose header
or first crop is bad is skipped with its AudioError reason; a file that fails later keeps the
crops read before, and its reason is still counted. Each crop's id is '{file}@{start_s:.3f}'.

Splits: `train`, and with validation_fraction > 0 also `validation`: a file goes to validation
when sha256 of its relative path, read as a number in [0, 1), is below the fraction, so the
held-out files never change when files are added and both splits are disjoint by file. A split
that gets no file is left out (metadata['empty_splits']).

Counts (examples, skipped by reason, repaired, captions-file problems under the pseudo-split
'captions', file names that are not UTF-8 under 'scan') are logged and kept in
builder.info.metadata (metadata.json; `builder_utils.skip_report(builder)`).

TFDS reuses a prepared dataset by config name: give each folder/setting its own name (or use
build_audio_folder, which derives one), and rebuild with overwrite=True after adding files.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import posixpath
import re
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from musiclm_jax.audio.io import (DEFAULT_SAMPLE_RATE, AudioError, AudioLimits, SkipCounter,
                                  audio_info, load_audio)
from musiclm_jax.data import builder_utils
from musiclm_jax.data.aspects import TagParseError, tags_from_value

DEFAULT_EXTENSIONS = ('wav', 'wave', 'flac', 'ogg', 'oga', 'opus', 'mp3', 'aif', 'aiff', 'm4a')
CAPTION_FILES = ('captions.csv', 'captions.jsonl')
# Crops are read one window at a time, so a long file costs no memory: allow long mixes.
FOLDER_LIMITS = AudioLimits(max_seconds=24 * 3600.0)
# A captions file larger than this is refused: it is metadata, not data.
MAX_CAPTIONS_BYTES = 256 * 1024 * 1024

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point manual_dir (or AudioFolderConfig(root=...)) at a folder of audio files (any depth:
.wav .flac .ogg .opus .mp3 .aif .aiff, .m4a if a decoder is installed). Optional captions in
that folder: captions.csv with columns file,caption,tags (tags ';'- or ','-separated) or
captions.jsonl with lines {"file": "sub/song.flac", "caption": "...", "tags": ["...", ...]};
`file` is relative to the folder."""


@dataclasses.dataclass(eq=False)
class AudioFolderConfig(tfds.core.BuilderConfig):
  """How to turn a folder into crops. Create one directly; no subclassing needed.

  Attributes:
    root: the folder; None uses TFDS's manual_dir (DownloadConfig(manual_dir=...)).
    sample_rate: the stored audio rate (Hz).
    clip_seconds: crop length.
    hop_seconds: distance between crop starts; None is clip_seconds (no overlap).
    min_seconds: the shortest partial crop kept (a short file, or a file's tail); None is
      half of clip_seconds.
    max_crops_per_file: at most this many crops from the start of each file; None for all.
    validation_fraction: the share of files held out as the `validation` split (by a hash of
      the path); 0 for no validation split.
    captions_file: a captions file (.csv or .jsonl), relative to root or absolute; None reads
      root/captions.csv and/or root/captions.jsonl if present.
    caption_from_filename: give files without a caption one made from the file name instead
      of an empty caption.
    extensions: audio file extensions to read (lowercase, no dot).
    limits: what counts as usable audio (AudioLimits).
  """
  name: str = 'default'
  root: Optional[str] = None
  sample_rate: int = DEFAULT_SAMPLE_RATE
  clip_seconds: float = 10.0
  hop_seconds: Optional[float] = None
  min_seconds: Optional[float] = None
  max_crops_per_file: Optional[int] = None
  validation_fraction: float = 0.0
  captions_file: Optional[str] = None
  caption_from_filename: bool = False
  extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
  limits: AudioLimits = FOLDER_LIMITS

  def __post_init__(self):
    builder_utils.check_positive('sample_rate', self.sample_rate)
    builder_utils.check_positive('clip_seconds', self.clip_seconds)
    builder_utils.check_positive('hop_seconds', self.hop_seconds, allow_none=True)
    builder_utils.check_positive('min_seconds', self.min_seconds, allow_none=True)
    if self.min_seconds is not None and self.min_seconds > self.clip_seconds:
      raise ValueError(f'min_seconds={self.min_seconds} is longer than clip_seconds='
                       f'{self.clip_seconds}')
    if self.max_crops_per_file is not None and self.max_crops_per_file < 1:
      raise ValueError(f'max_crops_per_file must be positive or None, got '
                       f'{self.max_crops_per_file!r}')
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(f'validation_fraction must be in [0, 1), got '
                       f'{self.validation_fraction!r}')
    self.extensions = tuple(e.lower().lstrip('.') for e in self.extensions)

  @property
  def hop(self) -> float:
    return self.clip_seconds if self.hop_seconds is None else self.hop_seconds

  @property
  def min_crop(self) -> float:
    return self.clip_seconds / 2 if self.min_seconds is None else self.min_seconds


@dataclasses.dataclass(frozen=True)
class Caption:
  caption: str
  tags: tuple[str, ...]


def crop_windows(duration_s: float, clip_s: float, hop_s: float, min_s: float,
                 max_crops: Optional[int] = None) -> Iterator[tuple[float, float]]:
  """The (start_s, length_s) crops of a file (the rule in the module docstring).

  Full crops start at 0, hop, 2 hop, ... while they fit; then one partial crop at the next
  start, if it is at least min_s long and reaches at least min_s past the end of the last full
  crop (for a file shorter than a crop: if the file is at least min_s long).
  """
  count = 0
  # A crop "fits" up to a microsecond of rounding in the header's duration.
  eps = 1e-6
  num_full = 0 if duration_s + eps < clip_s else int(math.floor((duration_s - clip_s + eps)
                                                                 / hop_s)) + 1
  for k in range(num_full):
    if max_crops is not None and count >= max_crops:
      return
    count += 1
    yield k * hop_s, clip_s
  if max_crops is not None and count >= max_crops:
    return
  start = num_full * hop_s
  covered = (num_full - 1) * hop_s + clip_s if num_full else 0.0
  # The tail must be min_s long and, when crops overlap, add min_s of audio not yet covered.
  if duration_s - max(start, covered) >= min_s - eps:
    yield start, duration_s - start


def scan_audio(root: str, extensions=DEFAULT_EXTENSIONS) -> list[str]:
  """Relative posix paths of the audio files under root, sorted, hidden entries skipped."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(files):
      ext = os.path.splitext(name)[1][1:].lower()
      if name.startswith('.') or ext not in extensions:
        continue
      rel = os.path.relpath(os.path.join(folder, name), root)
      found.append(rel.replace(os.sep, '/'))
  return sorted(found)


def normalize_entry(entry) -> tuple[Optional[str], Optional[str]]:
  """A captions file's `file` value -> (relative posix path, None) or (None, skip reason).

  Reasons: 'bad_entry' (not a non-empty string, NUL), 'outside_root' (absolute, a drive
  letter, or '..' climbing out of the folder).
  """
  if not isinstance(entry, str) or not entry.strip() or '\x00' in entry:
    return None, 'bad_entry'
  # Captions written on Windows use backslashes.
  path = entry.strip().replace('\\', '/')
  if path.startswith('/') or re.match(r'^[A-Za-z]:', path):
    return None, 'outside_root'
  path = posixpath.normpath(path)
  if path == '..' or path.startswith('../'):
    return None, 'outside_root'
  return path, None


def _caption_sources(root: str, captions_file: Optional[str]) -> list[str]:
  if captions_file:
    path = captions_file if os.path.isabs(captions_file) else os.path.join(root, captions_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'captions_file {path!r} does not exist')
    return [path]
  return [os.path.join(root, n) for n in CAPTION_FILES if os.path.isfile(os.path.join(root, n))]


def _caption_records(path: str, problems: SkipCounter) -> Iterator[tuple[str, Any, Any, Any]]:
  """(where, file, caption, tags) per entry of a .csv or .jsonl captions file."""
  if os.path.getsize(path) > MAX_CAPTIONS_BYTES:
    raise ValueError(f'{path}: larger than {MAX_CAPTIONS_BYTES} bytes; not a captions file?')
  name = os.path.basename(path)
  if path.lower().endswith('.jsonl'):
    with open(path, encoding='utf-8', errors='replace') as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError as e:
          problems.skip('bad_entry', f'{name}:{i}', f'not JSON: {e}')
          continue
        if not isinstance(record, dict):
          problems.skip('bad_entry', f'{name}:{i}', 'not a JSON object')
          continue
        yield f'{name}:{i}', record.get('file'), record.get('caption'), record.get('tags')
    return
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    reader = csv.DictReader(f)
    if 'file' not in (reader.fieldnames or ()):
      raise ValueError(f'{path}: a captions CSV needs a header with a `file` column (and '
                       f'`caption`, `tags`); got {reader.fieldnames}')
    try:
      for row in reader:
        yield f'{name}:{reader.line_num}', row.get('file'), row.get('caption'), row.get('tags')
    except csv.Error as e:
      raise ValueError(f'{path}: line {reader.line_num}: {e}') from None


def read_captions(root: str, audio_files: set[str], problems: SkipCounter,
                  captions_file: Optional[str] = None) -> dict[str, Caption]:
  """Reads the captions file(s) of a folder.

  Args:
    root: the folder.
    audio_files: the relative paths of its audio files (scan_audio): an entry must name one.
    problems: counts ignored entries by reason (see normalize_entry, plus 'not_found',
      'duplicate_entry', 'bad_entry' for a caption or tags of the wrong type).
    captions_file: an explicit captions file; None reads root/captions.{csv,jsonl}.

  Returns:
    relative path -> Caption.
  """
  captions: dict[str, Caption] = {}
  for path in _caption_sources(root, captions_file):
    for where, entry, caption, tags in _caption_records(path, problems):
      rel, reason = normalize_entry(entry)
      if reason:
        problems.skip(reason, where, repr(entry)[:200])
        continue
      if rel not in audio_files:
        problems.skip('not_found', where, rel)
        continue
      if rel in captions:
        problems.skip('duplicate_entry', where, rel)
        continue
      if caption is not None and not isinstance(caption, str):
        problems.skip('bad_entry', where, f'caption is a {type(caption).__name__}')
        continue
      try:
        tag_list = tags_from_value(tags)
      except TagParseError as e:
        problems.skip('bad_entry', where, f'tags: {e}')
        continue
      captions[rel] = Caption((caption or '').strip(), tuple(tag_list))
  return captions


def caption_from_name(rel: str) -> str:
  """'albums/my_song-live.flac' -> 'my song live'."""
  stem = os.path.splitext(posixpath.basename(rel))[0]
  return ' '.join(re.sub(r'[_\-.]+', ' ', stem).split())


def is_held_out(rel: str, fraction: float) -> bool:
  """Whether a file (relative path) belongs to the validation split."""
  return fraction > 0 and builder_utils.fraction_of(rel) < fraction


class AudioFolder(tfds.core.GeneratorBasedBuilder,
                  skip_registration=builder_utils.is_registered('audio_folder')):
  """Crops of the audio files in a folder, with optional captions (see the module docstring)."""

  name = 'audio_folder'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [AudioFolderConfig(name='default', description='10 s crops, no overlap.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    features = builder_utils.common_features(self.builder_config.sample_rate)
    features.update({
        'file': tfds.features.Text(),
        'start_s': np.float32,
        'end_s': np.float32,
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fixed-length crops of a folder of audio files, mono int16, with captions.',
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(builder_utils.empty_metadata()),
    )

  def _root(self, dl_manager) -> str:
    root = self.builder_config.root
    root = os.path.expanduser(root) if root else os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(root):
      raise FileNotFoundError(f'audio_folder: {root!r} is not a folder.\n'
                              f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return os.path.abspath(root)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    root = self._root(dl_manager)
    scan_stats = builder_utils.SplitStats('audio_folder', 'scan')
    files = []
    for rel in scan_audio(root, config.extensions):
      try:
        rel.encode('utf-8')  # ids and `file` are UTF-8 text
      except UnicodeEncodeError:
        scan_stats.skips.skip('bad_file_name', rel.encode('utf-8', 'replace').decode())
        continue
      files.append(rel)
    scan_stats.examples = len(files)
    scan_stats.store(self.info.metadata)
    if not files:
      raise FileNotFoundError(
          f'audio_folder: no audio file ({", ".join(config.extensions)}) under {root}.\n'
          f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    caption_stats = builder_utils.SplitStats('audio_folder', 'captions')
    captions = read_captions(root, set(files), caption_stats.skips, config.captions_file)
    caption_stats.examples = len(captions)
    metadata = self.info.metadata
    caption_stats.store(metadata)
    by_split = {'train': [], 'validation': []}
    for rel in files:
      by_split['validation' if is_held_out(rel, config.validation_fraction) else 'train'].append(
          rel)
    wanted = ['train'] + (['validation'] if config.validation_fraction > 0 else [])
    metadata['empty_splits'] = [s for s in wanted if not by_split[s]]
    for split in metadata['empty_splits']:
      logging.warning('audio_folder: no file falls in %s; leaving the split out', split)
    metadata['files'] = {s: len(by_split[s]) for s in wanted}
    return {split: self._generate_examples(root, by_split[split], captions, split)
            for split in wanted if by_split[split]}

  def _generate_examples(self, root: str, files: list[str], captions: dict[str, Caption],
                         split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    config = self.builder_config
    stats = builder_utils.SplitStats('audio_folder', split)
    for rel in files:
      caption, repair = captions.get(rel), None
      if caption is None:
        repair = 'caption_from_filename' if config.caption_from_filename else 'no_caption'
        caption = Caption(caption_from_name(rel) if config.caption_from_filename else '', ())
      crops = 0
      for start_s, audio in self._crops(os.path.join(root, *rel.split('/')), rel, stats):
        example_id = f'{rel}@{start_s:.3f}'
        crops += 1
        yield example_id, {
            'audio': builder_utils.to_int16(audio),
            'caption': caption.caption,
            'aspects': list(caption.tags),
            'id': example_id,
            'file': rel,
            'start_s': start_s,
            'end_s': start_s + len(audio) / config.sample_rate,
        }
      stats.examples += crops
      # Counted per file that made examples: a skipped file's caption does not matter.
      if crops and repair:
        stats.warnings.skip(repair, rel)
    stats.store(self.info.metadata)
    if not stats.examples:
      raise RuntimeError(f'audio_folder/{split}: every file was skipped: '
                         f'{stats.skips.report()}')

  def _crops(self, path: str, rel: str, stats: builder_utils.SplitStats
             ) -> Iterator[tuple[float, np.ndarray]]:
    """(start_s, float32 audio) per crop of one file; problems are counted in stats."""
    config = self.builder_config
    kept = silent = 0
    with stats.skips.guard(rel):
      info = audio_info(path, config.limits)
      windows = list(crop_windows(info.duration_s, config.clip_seconds, config.hop,
                                  config.min_crop, config.max_crops_per_file))
      if not windows:
        raise AudioError(path, 'too_short', f'{info.duration_s:.2f} s, need '
                         f'{config.min_crop:.2f} s')
      for start_s, length_s in windows:
        try:
          audio = load_audio(path, config.sample_rate, offset_s=start_s, duration_s=length_s,
                             limits=config.limits)
        except AudioError as e:
          if e.reason != 'silent':
            raise
          silent += 1
          continue
        kept += 1
        # Resampling a window can be a sample off its nominal length.
        yield start_s, builder_utils.fit_length(audio, int(round(length_s * config.sample_rate)))
    if silent and not kept:
      stats.skips.skip('silent', rel, f'all {silent} crops silent')
    elif silent:
      for _ in range(silent):
        stats.skips.skip('silent_crop', rel)


def build_audio_folder(folder: str, data_dir: str, name: Optional[str] = None,
                       overwrite: bool = False, **config
                       ) -> tuple[AudioFolder, dict[str, Any]]:
  """Builds (or loads, if already built) a folder of audio as a TFDS dataset.

  Args:
    folder: the music folder (layout: module docstring); passed as TFDS's manual_dir.
    data_dir: the TFDS data directory (data ends up in data_dir/audio_folder/<name>/1.0.0).
    name: the config name; None makes one from the folder's name and a hash of the folder
      path and the config arguments, so different folders or settings never share a directory.
    overwrite: rebuild even if the data already exists (e.g. after adding files).
    **config: AudioFolderConfig fields (clip_seconds, hop_seconds, validation_fraction, ...).

  Returns:
    the builder (builder.as_dataset(split='train')) and skip_report(builder).
  """
  folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
  if name is None:
    name = builder_utils.config_name(os.path.basename(folder), dict(config, folder=folder))
  builder = builder_utils.prepare(
      lambda: AudioFolder(config=AudioFolderConfig(name=name, **config), data_dir=data_dir),
      manual_dir=folder, overwrite=overwrite)
  return builder, builder_utils.skip_report(builder)

# The report of a built or loaded builder (see builder_utils.skip_report).
skip_report = builder_utils.skip_report
