"""Tests for audio I/O: every kind of bad file is an AudioError naming it; good files load right."""

import math
import os
import struct

import numpy as np
import pytest
import soundfile as sf

from musiclm_jax.audio import io as audio_io
from musiclm_jax.audio.io import AudioError, AudioLimits
from tests.audio.bad_files import _patch_fmt  # rewrites a wav header's rate / channels

SR = 24000


def _sine(seconds=0.5, freq=440.0, sr=SR, amp=0.5):
  t = np.arange(int(round(seconds * sr))) / sr
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write(path, audio, sr=SR, subtype=None):
  """Writes [samples] or [channels, samples] with soundfile; returns the path as a str."""
  audio = np.asarray(audio)
  sf.write(str(path), audio.T if audio.ndim == 2 else audio, sr, subtype=subtype)
  return str(path)


def _cut(src, dst, keep):
  """Copies the first `keep` bytes (an int) or fraction (a float) of src to dst."""
  data = open(src, 'rb').read()
  n = keep if isinstance(keep, int) else int(len(data) * keep)
  open(dst, 'wb').write(data[:n])
  return str(dst)


def _expect(path, reason, fn=audio_io.load_audio, **kwargs):
  """Asserts fn(path) raises AudioError with this reason and a message that names the file."""
  with pytest.raises(AudioError) as info:
    fn(path, **kwargs)
  error = info.value
  assert error.reason == reason, str(error)
  assert error.path == os.fspath(path)
  assert str(error).startswith(os.fspath(path)), str(error)
  return error


class _Decoded(BaseException):
  """Raised by the patched decoders; a BaseException so no `except Exception` can hide it."""


@pytest.fixture
def no_decode(monkeypatch):
  """Makes any attempt to read samples fail loudly: rejections must come from the header."""
  import librosa  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise _Decoded(f'samples were read: {args[:1]}')

  monkeypatch.setattr(sf, 'read', refuse)
  monkeypatch.setattr(sf.SoundFile, 'read', refuse)
  monkeypatch.setattr(librosa, 'load', refuse)


# ---------------------------------------------------------------------------
# Bad inputs: each must raise AudioError with the right reason, naming the file.
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def good_files(tmp_path_factory):
  """One short sine per format, written by soundfile: the sources for cut and patched files."""
  d = tmp_path_factory.mktemp('good')
  x = _sine(1.0)
  return {
      'wav': _write(d / 'a.wav', x),
      'flac': _write(d / 'a.flac', x),
      'ogg': _write(d / 'a.ogg', x, subtype='VORBIS'),
      'mp3': _write(d / 'a.mp3', x, subtype='MPEG_LAYER_III'),
      'float_wav': _write(d / 'f.wav', x, subtype='FLOAT'),
  }


def test_missing_file(tmp_path):
  _expect(str(tmp_path / 'nope.wav'), 'missing')
  _expect(tmp_path / 'nope.wav', 'missing', fn=audio_io.audio_info)  # PathLike too


def test_directory(tmp_path):
  d = tmp_path / 'dir.wav'
  d.mkdir()
  assert 'not a regular file' in _expect(str(d), 'missing').detail


# (format, bytes kept, reason). A cut wav keeps a header promising more data than there is;
# a cut flac has a good STREAMINFO header and fails mid-decode; libsndfile refuses to open a cut
# Ogg at all (it reads the last page for the length); a cut mp3 decodes to fewer samples.
TRUNCATIONS = [
    ('wav', 0.5, 'truncated'),
    ('wav', 30, 'unreadable'),  # cut inside the header
    ('flac', 0.5, 'truncated'),
    ('flac', 30, 'unreadable'),
    ('ogg', 0.5, 'unreadable'),
    ('mp3', 0.5, 'truncated'),
]


@pytest.mark.parametrize('fmt,keep,reason', TRUNCATIONS)
def test_truncated(good_files, tmp_path, fmt, keep, reason):
  path = _cut(good_files[fmt], tmp_path / f'cut.{fmt}', keep)
  error = _expect(path, reason)
  assert error.detail  # says what the decoder saw


@pytest.mark.parametrize('ext', ['wav', 'flac', 'ogg', 'mp3'])
def test_garbage_bytes(tmp_path, ext):
  path = tmp_path / f'garbage.{ext}'
  path.write_bytes(np.random.default_rng(0).bytes(4000))
  error = _expect(str(path), 'unreadable')
  assert 'libsndfile' in error.detail.lower()  # libsndfile's own message is kept


def test_text_renamed_wav(tmp_path):
  path = tmp_path / 'notes.wav'
  path.write_text('these are not the samples you are looking for\n' * 50)
  _expect(str(path), 'unreadable')


def test_zero_frames_valid_header(tmp_path):
  path = _write(tmp_path / 'zero.wav', np.zeros(0, np.float32))
  assert sf.info(path).frames == 0
  _expect(path, 'empty')
  _expect(path, 'empty', fn=audio_io.audio_info)


@pytest.mark.parametrize('ext', ['wav', 'mp3'])
def test_zero_bytes(tmp_path, ext):
  path = tmp_path / f'nothing.{ext}'
  path.write_bytes(b'')
  assert '0-byte' in _expect(str(path), 'empty').detail


def test_all_silent(tmp_path):
  path = _write(tmp_path / 'silence.wav', np.zeros(SR // 2, np.float32))
  _expect(path, 'silent')
  # When silence is allowed it loads as zeros.
  audio = audio_io.load_audio(path, limits=AudioLimits(reject_silent=False))
  assert audio.shape == (SR // 2,) and not np.any(audio)


def test_near_silent(tmp_path):
  quiet = _write(tmp_path / 'quiet.wav', _sine(amp=1e-5), subtype='FLOAT')
  assert '-100' in _expect(quiet, 'silent').detail
  lsb = _write(tmp_path / 'lsb.wav', _sine(amp=1.0 / 32768))  # 16-bit dither level: -90 dBFS
  _expect(lsb, 'silent')
  # Quiet but real music (-60 dBFS) passes.
  assert audio_io.load_audio(_write(tmp_path / 'soft.wav', _sine(amp=1e-3))).size == SR // 2


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
  x = _sine()
  x[1234] = bad
  path = _write(tmp_path / 'bad.wav', x, subtype='FLOAT')
  assert '1 NaN/Inf' in _expect(path, 'non_finite').detail


@pytest.mark.parametrize('rate', [1, 10_000_000])
def test_absurd_sample_rate(good_files, tmp_path, rate, no_decode):
  path = _patch_fmt(_cut(good_files['wav'], tmp_path / 'rate.wav', 1.0), sample_rate=rate)
  assert sf.info(path).samplerate == rate
  assert f'{rate} Hz' in _expect(path, 'bad_sample_rate').detail
  _expect(path, 'bad_sample_rate', fn=audio_io.audio_info)


def test_zero_sample_rate(good_files, tmp_path):
  path = _patch_fmt(_cut(good_files['wav'], tmp_path / 'rate0.wav', 1.0), sample_rate=0)
  _expect(path, 'unreadable')  # libsndfile refuses the header itself


def test_hundreds_of_channels_rejected_before_reading(tmp_path, no_decode):
  # Written before no_decode bites (soundfile writes, it does not read).
  path = _write(tmp_path / 'many.wav', np.full((300, 100), 0.1, np.float32))
  assert '300 channels' in _expect(path, 'too_many_channels').detail


def test_channels_beyond_libsndfile(good_files, tmp_path):
  path = _patch_fmt(_cut(good_files['wav'], tmp_path / 'ch.wav', 1.0), channels=2000)
  _expect(path, 'too_many_channels')


def test_zero_channels(good_files, tmp_path):
  path = _patch_fmt(_cut(good_files['wav'], tmp_path / 'ch0.wav', 1.0), channels=0)
  _expect(path, 'unreadable')


def test_header_claiming_hours_rejected_before_decoding(good_files, tmp_path, no_decode):
  # A real 5 h wav (864 MB of samples) as a sparse file: the header is honest, the data holes.
  data = bytearray(open(good_files['wav'], 'rb').read())
  nbytes = 5 * 3600 * SR * 2
  at = data.index(b'data')
  header = data[:at + 8]
  header[4:8] = struct.pack('<I', len(header) - 8 + nbytes)
  header[at + 4:at + 8] = struct.pack('<I', nbytes)
  path = str(tmp_path / 'long.wav')
  with open(path, 'wb') as f:
    f.write(header)
    f.truncate(len(header) + nbytes)
  assert os.stat(path).st_blocks * 512 < 1 << 20  # nothing was written (or read) but a header
  assert sf.info(path).duration == pytest.approx(5 * 3600)
  error = _expect(path, 'too_long')  # default limits: 4 h
  assert '18000.0 s' in error.detail
  _expect(path, 'too_long', limits=AudioLimits(max_seconds=60))
  # A window inside it is still refused: the limit is on the file.
  _expect(path, 'too_long', offset_s=10.0, duration_s=1.0)


def test_longer_than_limit_rejected_before_decoding(good_files, no_decode):
  error = _expect(good_files['flac'], 'too_long', limits=AudioLimits(max_seconds=0.5))
  assert error.detail == '1.0 s, allowed 0.5 s'


def test_shorter_than_limit(good_files):
  _expect(good_files['wav'], 'too_short', limits=AudioLimits(min_seconds=2.0))


@pytest.mark.parametrize('offset', [1.0, 5.0, -0.1])
def test_offset_outside_file(good_files, offset):
  assert 'outside' in _expect(good_files['wav'], 'too_short', offset_s=offset).detail


def test_save_wav_refuses_non_finite(tmp_path):
  x = _sine()
  x[0] = np.nan
  path = str(tmp_path / 'out.wav')
  _expect(path, 'non_finite', fn=lambda p: audio_io.save_wav(p, x))
  assert not os.listdir(tmp_path)  # no file, no temporary left behind


def test_skip_counter_guard(good_files, tmp_path):
  skips = audio_io.SkipCounter('unit', log_first=2)
  assert skips.report() == 'unit: nothing skipped'
  (tmp_path / 'empty.wav').write_bytes(b'')
  paths = [good_files['wav'], str(tmp_path / 'a.wav'), str(tmp_path / 'b.wav'),
           str(tmp_path / 'empty.wav')]
  loaded = []
  for path in paths:
    with skips.guard(path):
      loaded.append(audio_io.load_audio(path))
  assert len(loaded) == 1
  assert skips.as_dict() == {'empty': 1, 'missing': 2}
  assert skips.total == 3
  assert skips.examples['missing'] == paths[1:3]
  assert skips.report() == 'unit: skipped 3 (empty: 1, missing: 2)'
  # Anything that is not an AudioError is a bug and propagates.
  with pytest.raises(ZeroDivisionError):
    with skips.guard('x'):
      _ = 1 / 0
  assert skips.total == 3


# ---------------------------------------------------------------------------
# Good inputs.
# ---------------------------------------------------------------------------


def _peak_hz(x, sr):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.argmax(spectrum) * sr / len(x)


@pytest.mark.parametrize('fmt', ['wav', 'flac', 'ogg', 'mp3'])
def test_formats_load(good_files, fmt):
  audio = audio_io.load_audio(good_files[fmt])
  assert audio.dtype == np.float32 and audio.ndim == 1
  info = audio_io.audio_info(good_files[fmt])
  assert (info.sample_rate, info.channels) == (SR, 1)
  assert audio.shape == (info.frames,)
  if fmt in ('wav', 'flac'):  # lossless up to 16-bit quantisation
    np.testing.assert_allclose(audio, _sine(1.0), atol=1.0 / 32768)
  else:  # lossy: the tone survives (mp3 may shift it by the codec delay)
    assert abs(audio.shape[0] - SR) <= 2048
    assert _peak_hz(audio, SR) == pytest.approx(440.0, abs=2.0)
    assert np.max(np.abs(audio)) == pytest.approx(0.5, abs=0.1)


def test_stereo_downmix_is_channel_mean(tmp_path):
  left, right = _sine(freq=440.0), _sine(freq=660.0, amp=0.25)
  path = _write(tmp_path / 'stereo.wav', np.stack([left, right]), subtype='FLOAT')
  both = audio_io.load_audio(path, mono=False)
  assert both.shape == (2, SR // 2)
  np.testing.assert_array_equal(both[0], left)
  np.testing.assert_array_equal(audio_io.load_audio(path), both.mean(axis=0))
  # Resampling keeps the channel layout.
  assert audio_io.load_audio(path, 16000, mono=False).shape == (2, 8000)


@pytest.mark.parametrize('rate', [44100, 48000, 16000, 8000])
def test_resampled_to_24k(tmp_path, rate):
  n = int(0.5 * rate) + 7  # not a whole number of output samples
  freq = 1000.0  # below every Nyquist here
  path = _write(tmp_path / f'{rate}.wav', _sine(n / rate, freq, sr=rate), sr=rate,
                subtype='FLOAT')
  audio = audio_io.load_audio(path)
  assert audio.shape == (math.floor(n * SR / rate + 0.5),)  # 16 kHz: 12010.5 -> 12011
  assert _peak_hz(audio, SR) == pytest.approx(freq, abs=SR / len(audio))
  # Amplitude is kept (away from the filter's edge transients).
  assert np.max(np.abs(audio[500:-500])) == pytest.approx(0.5, abs=0.01)
  native = audio_io.load_audio(path, sample_rate=None)
  assert native.shape == (n,)


def test_resample_lengths_and_band_limit():
  for n in (1, 100, 44099, 44100, 44101):
    out = audio_io.resample(np.ones(n, np.float32), 44100, 24000)
    assert out.shape == (math.floor(n * 24000 / 44100 + 0.5),)
  assert audio_io.resample(np.ones(3, np.float32), 16000, 24000).shape == (5,)  # 4.5 -> 5
  # A 15 kHz tone is above 24 kHz's Nyquist: band-limited resampling removes it (no alias).
  tone = _sine(1.0, 15000.0, sr=44100)
  assert np.max(np.abs(audio_io.resample(tone, 44100, 24000)[1000:-1000])) < 1e-3
  assert audio_io.resample(np.ones((3, 2, 441)), 44100, 24000).shape == (3, 2, 240)
  with pytest.raises(ValueError):
    audio_io.resample(tone, 0, 24000)


def test_offset_and_duration_windows(tmp_path):
  x = np.random.default_rng(0).uniform(-0.5, 0.5, SR).astype(np.float32)
  path = _write(tmp_path / 'noise.wav', x, subtype='FLOAT')
  window = audio_io.load_audio(path, None, offset_s=0.25, duration_s=0.5)
  np.testing.assert_array_equal(window, x[SR // 4:SR // 4 + SR // 2])
  # A window running past the end is cut at the end.
  np.testing.assert_array_equal(audio_io.load_audio(path, None, offset_s=0.75, duration_s=9.0),
                                x[3 * SR // 4:])
  assert audio_io.load_audio(path, 16000, offset_s=0.5, duration_s=0.25).shape == (4000,)


def test_loudness_db():
  assert audio_io.loudness_db(_sine(amp=1.0), SR) == pytest.approx(-3.01, abs=0.01)
  # Silence between notes is gated out: a tone then as long a pause measures as the tone.
  gapped = np.concatenate([_sine(1.2, amp=0.1), np.zeros(SR, np.float32)])  # 3 whole blocks
  assert audio_io.loudness_db(gapped, SR) == pytest.approx(-23.01, abs=0.01)
  assert audio_io.loudness_db(np.zeros(SR), SR) == -np.inf
  stereo = np.stack([_sine(amp=0.1), _sine(amp=0.1)])
  assert audio_io.loudness_db(stereo, SR) == pytest.approx(-23.01, abs=0.01)


def test_normalize_loudness_hits_target_and_peak_limit():
  x = _sine(1.0, amp=0.05)
  y = audio_io.normalize_loudness(x, -20.0, SR)
  assert audio_io.loudness_db(y, SR) == pytest.approx(-20.0, abs=0.01)
  assert y.dtype == np.float32
  # A click makes the peak the limit: scaled down so the peak is exactly `peak`.
  spiky = x.copy()
  spiky[100] = 0.9
  z = audio_io.normalize_loudness(spiky, -10.0, SR, peak=0.99)
  assert np.max(np.abs(z)) == pytest.approx(0.99, rel=1e-5)
  assert audio_io.loudness_db(z, SR) < -10.0
  # A quiet fade (-75 dBFS) under the gate that the gain lifts above it: still on target.
  faded = np.concatenate([_sine(1.0, amp=0.01), _sine(1.0, amp=0.00025)])
  assert audio_io.loudness_db(audio_io.normalize_loudness(faded, -20.0, SR),
                              SR) == pytest.approx(-20.0, abs=0.01)
  silence = np.zeros(SR, np.float32)
  np.testing.assert_array_equal(audio_io.normalize_loudness(silence, -20.0, SR), silence)


def test_load_audio_normalizes_loudness(good_files):
  audio = audio_io.load_audio(good_files['wav'], loudness_db=-30.0)
  assert audio_io.loudness_db(audio, SR) == pytest.approx(-30.0, abs=0.01)


def test_save_wav_round_trip(tmp_path):
  x = _sine(freq=1000.0, amp=0.9)
  path = audio_io.save_wav(tmp_path / 'sub' / 'out.wav', x)  # makes the directory
  assert path == str(tmp_path / 'sub' / 'out.wav')
  back, sr = sf.read(path, dtype='float32')
  assert sr == SR and sf.info(path).subtype == 'PCM_16'
  assert np.max(np.abs(back - x)) <= 1.0 / 32768  # half an int16 step, plus rounding slack
  assert audio_io.load_audio(path).shape == x.shape
  # Out-of-range floats are clipped, not wrapped.
  audio_io.save_wav(path, np.array([2.0, -2.0, 0.5], np.float32))
  np.testing.assert_allclose(sf.read(path)[0], [32767 / 32768, -1.0, 0.5], atol=1e-4)
  # int16 and stereo [channels, samples] in; FLOAT is exact.
  ints = (x * 32767).astype(np.int16)
  audio_io.save_wav(path, ints)
  np.testing.assert_array_equal(sf.read(path, dtype='int16')[0], ints)
  stereo = np.stack([x, -x])
  audio_io.save_wav(path, stereo, 16000, subtype='FLOAT')
  np.testing.assert_array_equal(audio_io.load_audio(path, None, mono=False), stereo)
  # Same permissions as any other new file (not the temporary file's 0600).
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_save_wav_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / 'keep.wav')
  audio_io.save_wav(path, _sine())
  before = open(path, 'rb').read()

  def half_write(file, *args, **kwargs):
    with open(file, 'wb') as f:
      f.write(b'RIFF half a header')
    raise OSError('disk full')

  monkeypatch.setattr(sf, 'write', half_write)
  with pytest.raises(OSError, match='disk full'):
    audio_io.save_wav(path, _sine(freq=880.0))
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['keep.wav']  # the temporary file is gone
