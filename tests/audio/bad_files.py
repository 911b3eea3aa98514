"""A catalogue of bad audio files, one per way a file can be unusable, for pipeline tests."""
from __future__ import annotations

import os
import struct

import numpy as np
import soundfile as sf

SR = 24000


def sine(seconds: float, freq: float = 440.0, sr: int = SR, amp: float = 0.5) -> np.ndarray:
  t = np.arange(int(round(seconds * sr))) / sr
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _patch_fmt(path: str, sample_rate=None, channels=None) -> str:
  """Rewrites a wav's 'fmt ' fields in place (values soundfile refuses to write)."""
  data = bytearray(open(path, 'rb').read())
  fmt = data.index(b'fmt ') + 8
  if channels is not None:
    data[fmt + 2:fmt + 4] = struct.pack('<H', channels)
  if sample_rate is not None:
    block_align = struct.unpack('<H', data[fmt + 12:fmt + 14])[0]
    data[fmt + 4:fmt + 8] = struct.pack('<I', sample_rate)
    data[fmt + 8:fmt + 12] = struct.pack('<I', (sample_rate * block_align) & 0xFFFFFFFF)
  open(path, 'wb').write(bytes(data))
  return path


def _cut(src: str, dst: str, fraction: float) -> str:
  data = open(src, 'rb').read()
  open(dst, 'wb').write(data[:int(len(data) * fraction)])
  return dst


def _sparse_long_wav(path: str, hours: float):
  """A wav whose (honest) header promises `hours` of 16-bit mono; the data are file holes."""
  template = path + '.template.wav'
  sf.write(template, sine(0.1), SR, subtype='PCM_16')
  data = bytearray(open(template, 'rb').read())
  os.remove(template)
  nbytes = int(hours * 3600 * SR * 2)
  at = data.index(b'data')
  header = data[:at + 8]
  header[4:8] = struct.pack('<I', len(header) - 8 + nbytes)
  header[at + 4:at + 8] = struct.pack('<I', nbytes)
  with open(path, 'wb') as f:
    f.write(header)
    f.truncate(len(header) + nbytes)


def write_bad_files(folder: str, stem_prefix: str = '', seconds: float = 10.0
                    ) -> dict[str, str]:
  """Writes one file per kind of bad input into `folder`.

  Args:
    folder: where to write (must exist).
    stem_prefix: prepended to every file stem (e.g. to make MusicCaps-style ytids).
    seconds: the length of the files that are otherwise fine.

  Returns:
    {file name: the AudioError reason a pipeline must count it under}. Files far longer than
    expected need `AudioLimits(max_seconds=...)` below 2 hours to count as 'too_long'. (A cut
    Ogg file of a few seconds is refused outright by libsndfile, 'unreadable'; the 10 s one here
    opens and is found 'truncated'.)
  """
  def p(stem, ext):
    return os.path.join(folder, f'{stem_prefix}{stem}.{ext}')

  reasons = {}
  good = {}
  for ext in ('wav', 'flac', 'mp3', 'ogg'):
    good[ext] = p(f'template_{ext}', ext) + '.tmp'
    sf.write(good[ext], sine(seconds), SR, format=ext.upper() if ext != 'mp3' else 'MP3')
  rng = np.random.default_rng(0)

  def add(stem, ext, reason):
    reasons[os.path.basename(p(stem, ext))] = reason
    return p(stem, ext)

  _cut(good['wav'], add('truncated_wav', 'wav', 'truncated'), 0.5)
  _cut(good['flac'], add('truncated_flac', 'flac', 'truncated'), 0.5)
  _cut(good['mp3'], add('truncated_mp3', 'mp3', 'truncated'), 0.5)
  _cut(good['ogg'], add('truncated_ogg', 'ogg', 'truncated'), 0.5)
  _cut(good['wav'], add('header_cut', 'wav', 'unreadable'), 30 / os.path.getsize(good['wav']))
  for ext in ('wav', 'flac', 'ogg', 'mp3'):
    with open(add(f'garbage_{ext}', ext, 'unreadable'), 'wb') as f:
      f.write(rng.bytes(4000))
  with open(add('text_file', 'wav', 'unreadable'), 'w') as f:
    f.write('not audio at all\n' * 100)
  sf.write(add('zero_frames', 'wav', 'empty'), np.zeros(0, np.float32), SR)
  open(add('zero_bytes', 'wav', 'empty'), 'wb').close()
  sf.write(add('all_silent', 'wav', 'silent'), np.zeros(int(seconds * SR), np.float32), SR)
  for stem, bad in (('nan', np.nan), ('inf', np.inf)):
    x = sine(seconds)
    x[100] = bad
    sf.write(add(f'{stem}_samples', 'wav', 'non_finite'), x, SR, subtype='FLOAT')
  for stem, rate in (('rate_1hz', 1), ('rate_10mhz', 10_000_000)):
    path = add(stem, 'wav', 'bad_sample_rate')
    sf.write(path, sine(seconds), SR, subtype='PCM_16')
    _patch_fmt(path, sample_rate=rate)
  sf.write(add('channels_300', 'wav', 'too_many_channels'),
           np.full((SR // 10, 300), 0.1, np.float32), SR)
  path = add('channels_2000', 'wav', 'too_many_channels')
  sf.write(path, sine(seconds), SR, subtype='PCM_16')
  _patch_fmt(path, channels=2000)
  _sparse_long_wav(add('two_hours', 'wav', 'too_long'), hours=2.0)
  for path in good.values():
    os.remove(path)
  return reasons
