"""Audio files in and out: load (any format soundfile or librosa reads), downmix, resample, save.

Every way a file can be bad raises `AudioError`, which names the file and carries a short
`reason` code (`REASONS`). Dataset builders catch it and count the reason with a `SkipCounter`
instead of crashing; the single-file API lets it propagate. The header is checked before any
samples are read, so a file with hundreds of channels or hours of audio is rejected without
loading it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
from typing import Iterator, Optional, Union

import numpy as np

from musiclm_jax.common.atomic import write_atomically

PathLike = Union[str, os.PathLike]
DEFAULT_SAMPLE_RATE = 24000

# Why a file was rejected. Builders report counts per reason, so keep these stable.
REASONS = (
    'missing',            # no such file
    'unreadable',         # no decoder could open it (corrupt, wrong format, not audio)
    'truncated',          # fewer samples than the header promises
    'empty',              # zero samples
    'too_short',          # shorter than AudioLimits.min_seconds
    'too_long',           # longer than AudioLimits.max_seconds
    'bad_sample_rate',    # outside AudioLimits.min_sample_rate..max_sample_rate
    'too_many_channels',  # more than AudioLimits.max_channels
    'non_finite',         # NaN or Inf samples
    'silent',             # peak below AudioLimits.silence_db
)


_TRUNCATION_LOG = re.compile(r'^data\s*:\s*\d+ \(should be \d+\)|File ended unexpectedly.*$',
                             re.MULTILINE)


class AudioError(ValueError):
  """A file that cannot be used as audio; `path` and `reason` (one of REASONS) say why."""

  def __init__(self, path: PathLike, reason: str, detail: str = ''):
    assert reason in REASONS, reason
    self.path = os.fspath(path)
    self.reason = reason
    self.detail = detail
    super().__init__(f'{self.path}: {reason}' + (f' ({detail})' if detail else ''))


@dataclasses.dataclass(frozen=True)
class AudioLimits:
  """What counts as usable audio.

  Attributes:
    min_sample_rate, max_sample_rate: header rates outside this range are absurd (a corrupt
      header, or not audio at all).
    max_channels: more channels than this is not music we can downmix meaningfully.
    min_seconds: shorter files are rejected as 'too_short' (0 still rejects empty files).
    max_seconds: longer files are rejected as 'too_long' before reading; None for no limit.
    silence_db: a file whose peak is below this (dBFS) is 'silent'.
    reject_silent: whether silence is an error (dataset building: yes).
  """
  min_sample_rate: int = 4000
  max_sample_rate: int = 384000
  max_channels: int = 32
  min_seconds: float = 0.0
  max_seconds: Optional[float] = 4 * 3600.0
  silence_db: float = -80.0
  reject_silent: bool = True


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  """What a file's header says."""
  path: str
  sample_rate: int
  channels: int
  frames: int
  format: str

  @property
  def duration_s(self) -> float:
    return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: PathLike, limits: AudioLimits = AudioLimits()) -> AudioInfo:
  """Reads and checks a file's header (rate, channels, length) without decoding the samples.

  Raises:
    AudioError: missing file, no decoder, or a header outside `limits`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioError(path, 'missing', 'not a regular file' if os.path.exists(path) else '')
  if os.path.getsize(path) == 0:
    # Not a decoder problem: an interrupted download or copy. Say so instead of 'unreadable'.
    raise AudioError(path, 'empty', '0-byte file')
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  try:
    raw = sf.info(path)
    info = AudioInfo(path, int(raw.samplerate), int(raw.channels), int(raw.frames), raw.format)
  except Exception as e:  # pylint: disable=broad-except  # libsndfile cannot open it: try audioread
    sf_error = f'{type(e).__name__}: {e}'
    if 'Too many channels' in str(e):
      # libsndfile refuses headers over its own channel limit (1024) before we can count them.
      raise AudioError(path, 'too_many_channels', sf_error) from None
    info = _audioread_info(path, sf_error)
  else:
    # libsndfile reads what is there of a cut-off file and says so only in its log.
    cut = _TRUNCATION_LOG.search(raw.extra_info or '')
    if cut:
      raise AudioError(path, 'truncated', cut.group(0).strip())
  _check_header(info, limits)
  return info


def _audioread_info(path: str, sf_error: str = '') -> AudioInfo:
  try:
    import audioread  # pylint: disable=g-import-not-at-top
    with audioread.audio_open(path) as f:
      return AudioInfo(path, int(f.samplerate), int(f.channels),
                       int(round(f.duration * f.samplerate)), 'audioread')
  except Exception as e:  # pylint: disable=broad-except
    # Keep libsndfile's message: audioread's (often a bare NoBackendError) says nothing useful.
    detail = '; '.join(x for x in (sf_error, f'audioread: {type(e).__name__}: {e}'.strip()) if x)
    raise AudioError(path, 'unreadable', detail) from None


def _check_header(info: AudioInfo, limits: AudioLimits):
  if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
    raise AudioError(info.path, 'bad_sample_rate',
                     f'{info.sample_rate} Hz, allowed {limits.min_sample_rate}..'
                     f'{limits.max_sample_rate}')
  if info.channels < 1 or info.channels > limits.max_channels:
    raise AudioError(info.path, 'too_many_channels' if info.channels > 1 else 'unreadable',
                     f'{info.channels} channels, allowed 1..{limits.max_channels}')
  if info.frames <= 0:
    raise AudioError(info.path, 'empty')
  if limits.max_seconds is not None and info.duration_s > limits.max_seconds:
    raise AudioError(info.path, 'too_long',
                     f'{info.duration_s:.1f} s, allowed {limits.max_seconds:.1f} s')


def load_audio(path: PathLike,
               sample_rate: Optional[int] = DEFAULT_SAMPLE_RATE,
               *,
               mono: bool = True,
               offset_s: float = 0.0,
               duration_s: Optional[float] = None,
               limits: AudioLimits = AudioLimits(),
               loudness_db: Optional[float] = None) -> np.ndarray:
  """Loads a file as float32, downmixed and resampled.

  Args:
    path: wav, flac, ogg, mp3 or anything else soundfile (libsndfile) or librosa can decode.
    sample_rate: the rate to return; None keeps the file's rate.
    mono: average the channels (True) or keep them as [channels, samples].
    offset_s, duration_s: read only this window (seconds in the file); the window must start
      inside the file.
    limits: what counts as usable audio (see AudioLimits).
    loudness_db: if set, normalise loudness to this level (dBFS, see normalize_loudness).

  Returns:
    float32 samples in [-1, 1]-ish: [samples] if mono else [channels, samples].

  Raises:
    AudioError: naming the file and the problem.
  """
  path = os.fspath(path)
  info = audio_info(path, limits)
  start = int(round(offset_s * info.sample_rate))
  if offset_s < 0 or start >= info.frames:
    raise AudioError(path, 'too_short', f'offset {offset_s:.2f} s is outside the '
                     f'{info.duration_s:.2f} s file')
  stop = info.frames if duration_s is None else min(
      info.frames, start + int(round(duration_s * info.sample_rate)))
  audio = _decode(info, start, stop)  # [samples, channels]
  if audio.shape[0] < stop - start:
    # libsndfile trusts the data it finds; fewer frames than the header means a cut-off file.
    raise AudioError(path, 'truncated', f'{audio.shape[0]} of {stop - start} samples')
  if audio.shape[0] == 0:
    raise AudioError(path, 'empty')
  if not np.all(np.isfinite(audio)):
    raise AudioError(path, 'non_finite', f'{int(np.sum(~np.isfinite(audio)))} NaN/Inf samples')
  if audio.shape[0] < limits.min_seconds * info.sample_rate:
    raise AudioError(path, 'too_short', f'{audio.shape[0] / info.sample_rate:.2f} s, need '
                     f'{limits.min_seconds:.2f} s')
  peak = float(np.max(np.abs(audio)))
  if limits.reject_silent and peak <= 10 ** (limits.silence_db / 20):
    raise AudioError(path, 'silent', f'peak {_db(peak):.1f} dBFS')
  audio = audio.T  # [channels, samples]
  if mono:
    audio = audio.mean(axis=0)
  if sample_rate is not None and sample_rate != info.sample_rate:
    audio = resample(audio, info.sample_rate, sample_rate)
  if loudness_db is not None:
    audio = normalize_loudness(audio, loudness_db, sample_rate or info.sample_rate)
  return np.ascontiguousarray(audio, dtype=np.float32)


def _decode(info: AudioInfo, start: int, stop: int) -> np.ndarray:
  """[samples, channels] float32 of frames start..stop, by libsndfile, else librosa/audioread."""
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  if info.format != 'audioread':
    try:
      return sf.read(info.path, start=start, stop=stop, dtype='float32', always_2d=True)[0]
    except Exception as e:  # pylint: disable=broad-except
      # The header was fine (audio_info read it), so the data ends or breaks before the frames
      # it promises: e.g. a cut-off FLAC fails with 'flac decoder lost sync'.
      raise AudioError(info.path, 'truncated', f'{type(e).__name__}: {e}') from None
  try:
    import librosa  # pylint: disable=g-import-not-at-top
    audio, _ = librosa.load(info.path, sr=None, mono=False, offset=start / info.sample_rate,
                            duration=(stop - start) / info.sample_rate, dtype=np.float32)
  except Exception as e:  # pylint: disable=broad-except
    raise AudioError(info.path, 'unreadable', f'{type(e).__name__}: {e}') from None
  return np.atleast_2d(audio).T


def resample(audio: np.ndarray, from_rate: int, to_rate: int, quality: str = 'HQ') -> np.ndarray:
  """Band-limited resampling along the last axis (soxr, librosa's default high-quality method).

  Output length is len * to_rate / from_rate rounded half up, floor(x + 0.5) (soxr's rule;
  Python's round() differs at exact halves).
  """
  if from_rate == to_rate:
    return np.asarray(audio, np.float32)
  if from_rate <= 0 or to_rate <= 0:
    raise ValueError(f'resample: sample rates must be positive, got {from_rate} -> {to_rate}')
  import soxr  # pylint: disable=g-import-not-at-top
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    return soxr.resample(audio, from_rate, to_rate, quality=quality).astype(np.float32)
  # soxr wants [samples, channels]; our multichannel layout is [..., samples].
  flat = audio.reshape(-1, audio.shape[-1]).T
  out = soxr.resample(np.ascontiguousarray(flat), from_rate, to_rate, quality=quality)
  return out.T.reshape(audio.shape[:-1] + (out.shape[0],)).astype(np.float32)


def _db(x: float) -> float:
  return 20 * np.log10(max(x, 1e-12))


def loudness_db(audio: np.ndarray, sample_rate: int, block_s: float = 0.4,
                gate_db: float = -70.0) -> float:
  """Gated RMS loudness in dBFS: RMS over 400 ms blocks louder than `gate_db` (BS.1770's gate,
  without its K-weighting filter). Silence between notes does not drag the level down."""
  x = np.asarray(audio, np.float64).reshape(-1, np.shape(audio)[-1]).mean(axis=0)
  block = max(1, int(block_s * sample_rate))
  n = max(1, len(x) // block)
  blocks = x[:n * block].reshape(n, -1) if len(x) >= block else x[None]
  power = np.mean(blocks ** 2, axis=1)
  loud = power[power > 10 ** (gate_db / 10)]
  if loud.size == 0:
    return -np.inf
  return float(10 * np.log10(np.mean(loud)))


def normalize_loudness(audio: np.ndarray, target_db: float = -20.0,
                       sample_rate: int = DEFAULT_SAMPLE_RATE, peak: float = 0.99) -> np.ndarray:
  """Scales to `target_db` gated RMS (see loudness_db), then down if the peak would exceed `peak`.

  Silent input is returned unchanged (no gain can make it loud).
  """
  level = loudness_db(audio, sample_rate)
  if not np.isfinite(level):
    return np.asarray(audio, np.float32)
  gain = 10 ** ((target_db - level) / 20)
  # The gate is absolute, so a gain can let quiet blocks (fades, pauses) through and lower the
  # measured level: re-measure and correct a few times (no-op for most music).
  for _ in range(4):
    level = loudness_db(np.asarray(audio, np.float64) * gain, sample_rate)
    if abs(level - target_db) < 0.01:
      break
    gain *= 10 ** ((target_db - level) / 20)
  top = float(np.max(np.abs(audio))) * gain
  if top > peak:
    gain *= peak / top
  return (np.asarray(audio, np.float32) * gain).astype(np.float32)


def save_wav(path: PathLike, audio: np.ndarray, sample_rate: int = DEFAULT_SAMPLE_RATE,
             subtype: str = 'PCM_16') -> str:
  """Writes a wav atomically (a temporary file renamed into place): a failure never leaves a
  half-written file or destroys an existing one.

  Args:
    audio: [samples] or [channels, samples] float in [-1, 1] (clipped) or int16.
    subtype: soundfile subtype, e.g. 'PCM_16', 'PCM_24', 'FLOAT'.
  Returns:
    the path written.
  """
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  audio = np.asarray(audio)
  if audio.dtype.kind == 'f':
    if not np.all(np.isfinite(audio)):
      raise AudioError(path, 'non_finite', 'refusing to write NaN/Inf samples')
    if not subtype.startswith('FLOAT') and not subtype.startswith('DOUBLE'):
      audio = np.clip(audio, -1.0, 1.0)
  data = audio.T if audio.ndim == 2 else audio
  return write_atomically(
      path, lambda tmp: sf.write(tmp, data, sample_rate, subtype=subtype, format='WAV'),
      suffix='.wav')


class SkipCounter:
  """Counts skipped items by reason while a dataset builds, and reports them.

  Usage:
    skips = SkipCounter('musiccaps/train')
    for path in paths:
      with skips.guard(path):
        audio = load_audio(path)
        ...
    logging.info(skips.report())
  """

  def __init__(self, name: str = 'build', log_first: int = 10):
    self.name = name
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self.log_first = log_first

  def skip(self, reason: str, item: str, detail: str = ''):
    """Records one skipped item."""
    self.counts[reason] += 1
    if len(self.examples[reason]) < 5:
      self.examples[reason].append(item)
    if sum(self.counts.values()) <= self.log_first:
      logging.warning('%s: skipping %s: %s%s', self.name, item, reason,
                      f' ({detail})' if detail else '')

  @contextlib.contextmanager
  def guard(self, item: str) -> Iterator[None]:
    """Runs a block; an AudioError inside it is counted as a skip instead of raised."""
    try:
      yield
    except AudioError as e:
      self.skip(e.reason, item, e.detail)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> dict[str, int]:
    return dict(sorted(self.counts.items()))

  def report(self) -> str:
    if not self.counts:
      return f'{self.name}: nothing skipped'
    parts = ', '.join(f'{r}: {n}' for r, n in sorted(self.counts.items()))
    return f'{self.name}: skipped {self.total} ({parts})'
