"""MusicCaps as a TFDS dataset: the official caption CSV plus the clips the user fetched.

MusicCaps (Agostinelli et al. 2023) is 5,521 ten-second YouTube clips with an expert caption
and an aspect (tag) list each. Google publishes only the CSV; the audio must be fetched by the
user (e.g. with yt-dlp), so this builder uses the TFDS manual_dir convention:

  manual_dir/
    musiccaps-public.csv          # the official CSV (or MusicCapsConfig.csv_path)
    {ytid}.{wav,flac,ogg,mp3}     # one file per CSV row, named by its YouTube id ...
    clips/{ytid}.wav              # ... or inside a clips/ or audio/ subfolder
    audio/{ytid}_{start_ms}-{end_ms}.flac   # the window may be part of the name

Each file is either the clip itself or the whole track. The rule, by the header's duration:
a file longer than the row's window (end_s - start_s, 10 s) by more than 1 s
(TRACK_THRESHOLD_S) is a whole track and is cut at start_s..end_s; anything else is the clip
and is read from its start. The audio is then resampled to `sample_rate` mono and must be
within `length_tolerance_s` of the window length; it is trimmed or zero-padded to exactly
window * sample_rate samples (240,000 at 24 kHz), so every example has the same length.

Nothing is fatal per row. Rows are checked once before any split: a ytid that is not a plain
YouTube id ([A-Za-z0-9_-]{1,64}, which rules out '..', '/', '\\', absolute paths, NUL) is
rejected as 'bad_ytid' and never reaches the file system (files are found by looking the ytid
up in a listing of the folders, never by building a path from it); an unparsable time, flag or
author id is 'bad_row'; a repeated ytid is 'duplicate_ytid'. These are counted under the
pseudo-split 'csv'. An aspect_list that is not a list of string literals (it is parsed, never
evaluated) becomes an empty list, counted as the warning 'bad_aspect_list'. Per split, a row
with no file is 'missing' and a bad file is skipped with its AudioError reason ('unreadable',
'silent', 'truncated', 'too_short', ...). The counts are logged at the end of each split and
kept in `builder.info.metadata` (saved as metadata.json; `builder_utils.skip_report(builder)`).
Only when no clip at all is found does the build fail, naming manual_dir and this layout.

Splits follow the CSV's flags: `train` = rows with is_audioset_eval False (2,663), `eval` =
is_audioset_eval True (2,858), `eval_balanced` = is_balanced_subset True (1,000, all of them
also in `eval`). A split for which no file was found is left out (and listed in
metadata['empty_splits']), so a user who fetched only the balanced eval set can still build.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import re
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from musiclm_jax.audio.io import (DEFAULT_SAMPLE_RATE, AudioError, AudioLimits, audio_info,
                                  load_audio)
from musiclm_jax.data import builder_utils
from musiclm_jax.data.aspects import TagParseError, parse_string_list, split_tags

CSV_NAME = 'musiccaps-public.csv'
CSV_COLUMNS = ('ytid', 'start_s', 'end_s', 'audioset_positive_labels', 'aspect_list', 'caption',
               'author_id', 'is_balanced_subset', 'is_audioset_eval')
AUDIO_EXTENSIONS = ('wav', 'flac', 'ogg', 'mp3')   # in order of preference for one ytid
CLIP_SUBDIRS = ('', 'clips', 'audio')              # manual_dir itself first
SPLITS = ('train', 'eval', 'eval_balanced')
# A file longer than the window by more than this is a whole track to cut, else the clip.
TRACK_THRESHOLD_S = 1.0
# YouTube ids are 11 characters of [A-Za-z0-9_-]; the bound leaves room for other sources
# while keeping any path syntax ('.', '/', '\\', ':', NUL) out.
_YTID = re.compile(r'[A-Za-z0-9_-]{1,64}')
_BOOLS = {'true': True, 'false': False, '1': True, '0': False}

_DESCRIPTION = """\
MusicCaps: 5,521 ten-second music clips from AudioSet with a caption and an aspect list
written by musicians. Audio is mono int16 at the config's sample rate, exactly
end_s - start_s long."""

_CITATION = """\
@article{agostinelli2023musiclm,
  title={MusicLM: Generating Music From Text},
  author={Agostinelli, Andrea and Denk, Timo I. and Borsos, Zal{\\'a}n and Engel, Jesse and
          Verzetti, Mauro and Caillon, Antoine and Huang, Qingqing and Jansen, Aren and
          Roberts, Adam and Tagliasacchi, Marco and Sharifi, Matt and Zeghidour, Neil and
          Frank, Christian},
  journal={arXiv preprint arXiv:2301.11325},
  year={2023}
}"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MusicCaps audio is on YouTube and must be fetched by you. Put in manual_dir:
  musiccaps-public.csv   the official CSV (https://www.kaggle.com/datasets/googleai/musiccaps),
                         or set MusicCapsConfig(csv_path=...)
  one audio file per row, named by the row's ytid, in manual_dir, manual_dir/clips/ or
  manual_dir/audio/:  {ytid}.wav|.flac|.ogg|.mp3  or  {ytid}_{start_ms}-{end_ms}.<ext>
                      (e.g. -0Gj8-vB1q4.wav or -0Gj8-vB1q4_30000-40000.flac)
A file may hold the 10 s clip itself, or the whole track: a file more than 1 s longer than
end_s - start_s is cut at start_s..end_s. Rows without a file are counted and skipped.
For example: yt-dlp -x --audio-format wav --download-sections "*30-40" \\
  -o "clips/%(id)s.%(ext)s" https://youtu.be/-0Gj8-vB1q4"""


@dataclasses.dataclass(eq=False)
class MusicCapsConfig(tfds.core.BuilderConfig):
  """How to build MusicCaps.

  Attributes:
    sample_rate: the stored audio rate (Hz); clips are resampled to it.
    length_tolerance_s: how far (seconds) a clip may fall short of end_s - start_s before it
      is skipped as 'too_short'; within it, it is zero-padded. Longer audio is trimmed.
    csv_path: the MusicCaps CSV; None reads manual_dir/musiccaps-public.csv.
    max_rows: read only the first rows of the CSV (quick trial builds); None reads all.
    limits: what counts as usable audio (AudioLimits: rates, channels, silence, ...).
  """
  name: str = 'default'
  sample_rate: int = DEFAULT_SAMPLE_RATE
  length_tolerance_s: float = 0.5
  csv_path: Optional[str] = None
  max_rows: Optional[int] = None
  limits: AudioLimits = AudioLimits()

  def __post_init__(self):
    builder_utils.check_positive('sample_rate', self.sample_rate)
    if not (self.length_tolerance_s >= 0):  # also refuses NaN
      raise ValueError(f'length_tolerance_s must be >= 0, got {self.length_tolerance_s!r}')
    if self.max_rows is not None and self.max_rows < 1:
      raise ValueError(f'max_rows must be positive or None, got {self.max_rows!r}')


@dataclasses.dataclass(frozen=True)
class MusicCapsRow:
  """One parsed CSV row."""
  ytid: str
  start_s: float
  end_s: float
  audioset_labels: tuple[str, ...]
  aspects: tuple[str, ...]
  caption: str
  author_id: int
  is_balanced_subset: bool
  is_audioset_eval: bool

  def splits(self) -> list[str]:
    """The splits this row belongs to (see the module docstring)."""
    out = ['eval' if self.is_audioset_eval else 'train']
    if self.is_balanced_subset:
      out.append('eval_balanced')
    return out


class RowError(ValueError):
  """A CSV row that cannot become an example; `reason` is the counted skip reason."""

  def __init__(self, reason: str, detail: str):
    self.reason = reason
    self.detail = detail
    super().__init__(f'{reason}: {detail}')


def is_valid_ytid(ytid) -> bool:
  """Whether `ytid` is a plain id that is safe to use in a file name (no path syntax)."""
  return isinstance(ytid, str) and _YTID.fullmatch(ytid) is not None


def _bool(value: str, column: str) -> bool:
  try:
    return _BOOLS[value.strip().lower()]
  except (KeyError, AttributeError):
    raise RowError('bad_row', f'{column}={value!r} is not True/False') from None


def _float(value: str, column: str) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise RowError('bad_row', f'{column}={value!r} is not a number') from None
  if not math.isfinite(x) or x < 0:
    raise RowError('bad_row', f'{column}={value!r} is not a time in seconds')
  return x


def parse_row(row: dict[str, Any], warnings=None) -> MusicCapsRow:
  """Parses and checks one CSV row (a csv.DictReader dict).

  Args:
    row: column -> text.
    warnings: optional SkipCounter for repairs: an aspect_list or label list that does not
      parse becomes an empty list, counted as 'bad_aspect_list' / 'bad_audioset_labels'.

  Returns:
    the row.

  Raises:
    RowError: 'bad_ytid' (not a plain YouTube id; the row must never reach the file system)
      or 'bad_row' (a time, flag or author id that does not parse; an empty window).
  """
  ytid = row.get('ytid')
  if not is_valid_ytid(ytid):
    raise RowError('bad_ytid', f'ytid {ytid!r} is not [A-Za-z0-9_-]{{1,64}}')
  start_s, end_s = _float(row.get('start_s'), 'start_s'), _float(row.get('end_s'), 'end_s')
  if end_s <= start_s:
    raise RowError('bad_row', f'empty window {start_s}..{end_s}')
  try:
    author_id = int(str(row.get('author_id')).strip())
  except ValueError:
    raise RowError('bad_row', f'author_id={row.get("author_id")!r} is not an integer') from None
  if not -2**31 <= author_id < 2**31:
    raise RowError('bad_row', f'author_id={author_id} does not fit int32')
  try:
    aspects = parse_string_list(row.get('aspect_list') or '')
  except TagParseError as e:
    aspects = []
    if warnings is not None:
      warnings.skip('bad_aspect_list', ytid, str(e))
  try:
    labels = split_tags(row.get('audioset_positive_labels') or '', separators=(',',))
  except TagParseError as e:
    labels = []
    if warnings is not None:
      warnings.skip('bad_audioset_labels', ytid, str(e))
  return MusicCapsRow(
      ytid=ytid, start_s=start_s, end_s=end_s, audioset_labels=tuple(labels),
      aspects=tuple(aspects), caption=(row.get('caption') or '').strip(), author_id=author_id,
      is_balanced_subset=_bool(row.get('is_balanced_subset'), 'is_balanced_subset'),
      is_audioset_eval=_bool(row.get('is_audioset_eval'), 'is_audioset_eval'))


def read_csv(path: str, max_rows: Optional[int] = None) -> list[dict[str, str]]:
  """Reads the MusicCaps CSV as raw row dicts (parse each with parse_row).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a column is missing, or the file is not a readable CSV.
  """
  rows = []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f'{path}: not a MusicCaps CSV, missing columns {missing} '
                       f'(have {reader.fieldnames})')
    try:
      for row in reader:
        rows.append(row)
        if max_rows is not None and len(rows) >= max_rows:
          break
    except (csv.Error, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: line {reader.line_num}: {e}') from None
  return rows


def find_csv(manual_dir: Optional[str], csv_path: Optional[str] = None) -> str:
  """The CSV to read: csv_path if set, else manual_dir/musiccaps-public.csv."""
  path = csv_path or (os.path.join(manual_dir, CSV_NAME) if manual_dir else None)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f'MusicCaps CSV not found at {path!r}: put {CSV_NAME} in manual_dir or set '
        f'MusicCapsConfig(csv_path=...).\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
  return path


def index_clips(manual_dir: str) -> dict[str, str]:
  """Maps file stem -> path for the audio files in manual_dir, clips/ and audio/.

  Only directory listings are read; a CSV ytid is then looked up by name in this map, so no
  path is ever built from CSV text. Where one stem has several files, the first subfolder in
  CLIP_SUBDIRS and then the first extension in AUDIO_EXTENSIONS wins.
  """
  index: dict[str, str] = {}
  for sub in CLIP_SUBDIRS:
    folder = os.path.join(manual_dir, sub) if sub else manual_dir
    if not os.path.isdir(folder):
      continue
    found = {}
    with os.scandir(folder) as entries:
      for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        ext = ext[1:].lower()
        if entry.name.startswith('.') or ext not in AUDIO_EXTENSIONS or not entry.is_file():
          continue
        rank = AUDIO_EXTENSIONS.index(ext)
        if stem not in found or rank < found[stem][0]:
          found[stem] = (rank, entry.path)
    for stem in sorted(found):
      index.setdefault(stem, found[stem][1])
  return index


def clip_for(index: dict[str, str], row: MusicCapsRow) -> Optional[str]:
  """The file of a row: {ytid}_{start_ms}-{end_ms} first, then {ytid}; None if neither."""
  windowed = f'{row.ytid}_{int(round(row.start_s * 1000))}-{int(round(row.end_s * 1000))}'
  return index.get(windowed) or index.get(row.ytid)


def load_clip(path: str, row: MusicCapsRow, sample_rate: int, length_tolerance_s: float,
              limits: AudioLimits = AudioLimits()) -> np.ndarray:
  """Loads a row's window from a clip or whole-track file (the rule in the module docstring).

  Returns:
    float32 mono audio of exactly round((end_s - start_s) * sample_rate) samples.

  Raises:
    AudioError: a bad file, a track that ends before the window, or a clip more than
      length_tolerance_s short.
  """
  window = row.end_s - row.start_s
  info = audio_info(path, limits)
  if info.duration_s > window + TRACK_THRESHOLD_S:
    # A whole track: the window must start inside it (else load_audio says 'too_short').
    audio = load_audio(path, sample_rate, offset_s=row.start_s, duration_s=window,
                       limits=limits)
  else:
    audio = load_audio(path, sample_rate, duration_s=window, limits=limits)
  num_samples = int(round(window * sample_rate))
  if len(audio) < num_samples - length_tolerance_s * sample_rate:
    raise AudioError(path, 'too_short', f'{len(audio) / sample_rate:.2f} s of the '
                     f'{window:.2f} s window {row.start_s:g}..{row.end_s:g}')
  return builder_utils.fit_length(audio, num_samples)


class MusicCaps(tfds.core.GeneratorBasedBuilder,
                skip_registration=builder_utils.is_registered('musiccaps')):
  """MusicCaps from the official CSV and user-fetched clips (see the module docstring)."""

  name = 'musiccaps'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [MusicCapsConfig(name='default', description='24 kHz mono int16 clips.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    features = builder_utils.common_features(self.builder_config.sample_rate)
    features.update({
        'ytid': tfds.features.Text(),
        'start_s': np.float32,
        'end_s': np.float32,
        'audioset_labels': tfds.features.Sequence(tfds.features.Text()),
        'author_id': np.int32,
        'is_balanced_subset': np.bool_,
        'is_audioset_eval': np.bool_,
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        homepage='https://www.kaggle.com/datasets/googleai/musiccaps',
        citation=_CITATION,
        license='CC-BY-SA-4.0 (captions); audio belongs to its YouTube owners',
        metadata=tfds.core.MetadataDict(builder_utils.empty_metadata()),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    raw_rows = read_csv(find_csv(manual_dir, config.csv_path), config.max_rows)
    # Rows are checked once, before any split: a rejected row belongs to no split, so its
    # count goes under the pseudo-split 'csv' of the report.
    csv_stats = builder_utils.SplitStats('musiccaps', 'csv')
    rows, seen = [], set()
    for raw in raw_rows:
      try:
        row = parse_row(raw, csv_stats.warnings)
      except RowError as e:
        csv_stats.skips.skip(e.reason, repr(raw.get('ytid'))[:80], e.detail)
        continue
      if row.ytid in seen:
        # The ytid is the example key and names the file: a second row cannot be told apart.
        csv_stats.skips.skip('duplicate_ytid', row.ytid)
        continue
      seen.add(row.ytid)
      rows.append(row)
    csv_stats.examples = len(rows)
    metadata = self.info.metadata
    csv_stats.store(metadata)
    index = index_clips(manual_dir)
    found = {split for row in rows if clip_for(index, row) for split in row.splits()}
    if not found:
      raise FileNotFoundError(
          f'No MusicCaps clip found in manual_dir {manual_dir} for any of the {len(rows)} '
          f'valid CSV rows ({len(index)} audio files there in all).\n'
          f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    metadata['empty_splits'] = [s for s in SPLITS if s not in found]
    for split in metadata['empty_splits']:
      logging.warning('musiccaps: no clip found for any %s row; leaving the split out', split)
    return {split: self._generate_examples(rows, index, split)
            for split in SPLITS if split in found}

  def _generate_examples(self, rows: list[MusicCapsRow], index: dict[str, str],
                         split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    config = self.builder_config
    stats = builder_utils.SplitStats('musiccaps', split)
    for row in rows:
      if split not in row.splits():
        continue
      path = clip_for(index, row)
      if path is None:
        stats.skips.skip('missing', row.ytid)
        continue
      audio = None
      with stats.skips.guard(row.ytid):
        audio = load_clip(path, row, config.sample_rate, config.length_tolerance_s,
                          config.limits)
      if audio is None:
        continue
      stats.examples += 1
      yield row.ytid, {
          'audio': builder_utils.to_int16(audio),
          'caption': row.caption,
          'aspects': list(row.aspects),
          'id': row.ytid,
          'ytid': row.ytid,
          'start_s': row.start_s,
          'end_s': row.end_s,
          'audioset_labels': list(row.audioset_labels),
          'author_id': row.author_id,
          'is_balanced_subset': row.is_balanced_subset,
          'is_audioset_eval': row.is_audioset_eval,
      }
    stats.store(self.info.metadata)
    if not stats.examples:
      raise RuntimeError(f'musiccaps/{split}: every clip was skipped: {stats.skips.report()}')


def build_musiccaps(manual_dir: str, data_dir: str, name: Optional[str] = None,
                    overwrite: bool = False, **config) -> tuple[MusicCaps, dict[str, Any]]:
  """Builds (or loads, if already built) MusicCaps from a manual_dir (layout: module docstring).

  Args:
    manual_dir: the folder with the CSV and the clips.
    data_dir: the TFDS data directory to write to (data_dir/musiccaps/<name>/1.0.0).
    name: the config name; None is 'default' without config arguments, else a name made from
      a hash of them, so different settings never share a directory.
    overwrite: rebuild even if the data already exists.
    **config: MusicCapsConfig fields (sample_rate, csv_path, max_rows, ...).

  Returns:
    the builder (builder.as_dataset(split=...)) and skip_report(builder).
  """
  if name is None:
    name = builder_utils.config_name('musiccaps', config) if config else 'default'
  builder_config = 'default' if name == 'default' and not config else MusicCapsConfig(
      name=name, **config)
  builder = builder_utils.prepare(
      lambda: MusicCaps(config=builder_config, data_dir=data_dir),
      manual_dir=os.fspath(manual_dir), overwrite=overwrite)
  return builder, builder_utils.skip_report(builder)

# The report of a built or loaded builder (see builder_utils.skip_report).
skip_report = builder_utils.skip_report
