"""STFT and log-mel spectrogram front-ends in JAX: jittable, batched, differentiable."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# A filter normalisation as in librosa.filters.mel: 'slaney' (unit area), None, or a p-norm.
MelNorm = Union[str, float, None]

# Framing by strided slices needs frame_length / gcd(frame_length, hop) of them (see _frame).
_MAX_FRAME_SLICES = 64


# ---------------------------------------------------------------------------
# STFT
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _window(window: str, win_length: int, n_fft: int) -> np.ndarray:
  """librosa's analysis window: periodic (`fftbins=True`), zero-padded to n_fft, centred."""
  import scipy.signal  # pylint: disable=g-import-not-at-top
  if win_length > n_fft:
    raise ValueError(f'win_length {win_length} > n_fft {n_fft}')
  w = scipy.signal.get_window(window, win_length, fftbins=True).astype(np.float32)
  # librosa.util.pad_center puts the extra sample on the right when n_fft - win_length is odd.
  left = (n_fft - win_length) // 2
  out = np.zeros(n_fft, np.float32)
  out[left:left + win_length] = w
  out.setflags(write=False)
  return out


def _num_frames(num_samples: int, n_fft: int, hop_length: int, center: bool) -> int:
  length = num_samples + 2 * (n_fft // 2) if center else num_samples
  return 0 if length < n_fft else 1 + (length - n_fft) // hop_length


def _frame(x: Array, frame_length: int, hop_length: int, method: Optional[str] = None) -> Array:
  """[..., samples] -> [..., frames, frame_length], frame k starting at sample k * hop_length.

  Two ways, same values:
    'gather': one gather with a static [frames, frame_length] index. Fastest on CPU (measured:
      framing 10 s at 24 kHz, n_fft 1024, hop 240/256, batch 8: ~2-4 ms vs ~4-20 ms).
    'slices': cut the signal into chunks of g = gcd(frame_length, hop) samples; a frame is
      frame_length / g consecutive chunks, so the frames are that many strided slices of the
      chunk array, concatenated. No gather, and the gradient is pads and adds instead of a
      scatter-add, which is what accelerators prefer (not measured here). Needs few slices, so
      only when frame_length / g <= _MAX_FRAME_SLICES.
  method None picks 'gather' on CPU, else 'slices' where possible.
  """
  n = x.shape[-1]
  num_frames = 1 + (n - frame_length) // hop_length
  g = math.gcd(frame_length, hop_length)
  per_frame, per_hop = frame_length // g, hop_length // g
  if method is None:
    method = ('slices' if jax.default_backend() != 'cpu' and per_frame <= _MAX_FRAME_SLICES
              else 'gather')
  if method == 'slices':
    num_chunks = (num_frames - 1) * per_hop + per_frame
    chunks = x[..., :num_chunks * g].reshape(x.shape[:-1] + (num_chunks, g))
    span = (num_frames - 1) * per_hop + 1
    pieces = [chunks[..., i:i + span:per_hop, :] for i in range(per_frame)]
    return jnp.concatenate(pieces, axis=-1)
  if method != 'gather':
    raise ValueError(f"_frame: method must be 'gather' or 'slices', got {method!r}")
  index = np.arange(num_frames)[:, None] * hop_length + np.arange(frame_length)[None, :]
  return x[..., index]


def stft(audio: Array,
         n_fft: int,
         hop_length: int,
         win_length: Optional[int] = None,
         window: str = 'hann',
         center: bool = True,
         pad_mode: str = 'constant') -> Array:
  """Short-time Fourier transform, matching `librosa.stft` (transposed, see Returns).

  Args:
    audio: [..., samples] real waveform (any leading batch axes; computed in float32, or
      float64 if given float64 with x64 enabled).
    n_fft: FFT size (frame length after zero-padding the window).
    hop_length: samples between frame starts.
    win_length: window length, <= n_fft (default n_fft); the window is zero-padded to n_fft,
      centred, as librosa does.
    window: a scipy.signal.get_window name; the periodic ('fftbins') version is used.
    center: pad n_fft // 2 samples on both sides, so frame k is centred on sample
      k * hop_length (librosa's default). Otherwise frame k starts there.
    pad_mode: how to pad when `center`: 'constant' (zeros, librosa's default), 'reflect',
      'edge', ... (any jnp.pad mode).

  Returns:
    complex64 [..., frames, n_fft // 2 + 1]: frames-major, the transpose of librosa's
    [freq, frames], so that time is the sequence axis the models consume. frames is
    1 + samples // hop_length with `center` (even n_fft), else
    1 + (samples - n_fft) // hop_length.

  Raises:
    ValueError: the (padded) signal is shorter than one frame.
  """
  audio = jnp.asarray(audio)
  if audio.dtype != jnp.float64:  # FFTs want float32 (bf16 inputs are common in models).
    audio = audio.astype(jnp.float32)
  win_length = n_fft if win_length is None else win_length
  if center:
    pad = [(0, 0)] * (audio.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    audio = jnp.pad(audio, pad, mode=pad_mode)
  if audio.shape[-1] < n_fft:
    raise ValueError(f'stft: {audio.shape[-1]} samples (after padding) < n_fft {n_fft}')
  frames = _frame(audio, n_fft, hop_length)  # [..., frames, n_fft]
  frames = frames * jnp.asarray(_window(window, win_length, n_fft), frames.dtype)
  return jnp.fft.rfft(frames, n=n_fft, axis=-1)


def _safe_sqrt(x: Array) -> Array:
  """sqrt with a zero (not NaN) gradient at 0: silent bins are common (zero padding, gating)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def magnitude_spectrogram(audio: Array,
                          n_fft: int,
                          hop_length: int,
                          win_length: Optional[int] = None,
                          window: str = 'hann',
                          center: bool = True,
                          pad_mode: str = 'constant',
                          power: float = 1.0) -> Array:
  """|STFT| ** power: [..., frames, n_fft // 2 + 1] float32 (arguments as in `stft`).

  power 1 is the magnitude, 2 the power spectrum. For power >= 1 the gradient is finite
  everywhere, also at bins that are exactly zero (where d|z|/dz is undefined, it is taken as 0).
  """
  spec = stft(audio, n_fft, hop_length, win_length, window, center, pad_mode)
  power_spec = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  if power == 2:
    return power_spec
  if power == 1:
    return _safe_sqrt(power_spec)
  return _safe_sqrt(power_spec) ** power


# ---------------------------------------------------------------------------
# Mel scale
# ---------------------------------------------------------------------------


def hz_to_mel(hz: np.ndarray, htk: bool = False) -> np.ndarray:
  """Hz to mels: HTK's 2595 log10(1 + f / 700), or Slaney's (linear below 1 kHz, log above)."""
  hz = np.asarray(hz, np.float64)
  if htk:
    return 2595.0 * np.log10(1.0 + hz / 700.0)
  f_sp = 200.0 / 3  # Slaney: 3 mels per 200 Hz up to 1 kHz ...
  min_log_hz = 1000.0
  min_log_mel = min_log_hz / f_sp
  logstep = np.log(6.4) / 27.0  # ... then 27 mels per factor 6.4 (1 kHz .. 6.4 kHz).
  return np.where(hz >= min_log_hz,
                  min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                  hz / f_sp)


def mel_to_hz(mels: np.ndarray, htk: bool = False) -> np.ndarray:
  """Inverse of `hz_to_mel`."""
  mels = np.asarray(mels, np.float64)
  if htk:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
  f_sp = 200.0 / 3
  min_log_hz = 1000.0
  min_log_mel = min_log_hz / f_sp
  logstep = np.log(6.4) / 27.0
  return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)),
                  f_sp * mels)


def mel_filterbank(sample_rate: int,
                   n_fft: int,
                   n_mels: int,
                   fmin: float = 0.0,
                   fmax: Optional[float] = None,
                   htk: bool = False,
                   norm: MelNorm = 'slaney') -> np.ndarray:
  """Triangular mel filters, as `librosa.filters.mel(...).T`.

  Args:
    sample_rate: audio sample rate (Hz).
    n_fft: FFT size; the filters cover its n_fft // 2 + 1 rfft bins.
    n_mels: number of filters.
    fmin, fmax: lowest and highest frequency (Hz) covered; fmax defaults to sample_rate / 2.
    htk: HTK mel scale instead of Slaney's.
    norm: 'slaney' scales each triangle to unit area (2 / bandwidth in Hz), so a flat spectrum
      gives equal energy per band; None leaves peaks at 1; a number p scales each filter to
      unit p-norm (librosa.util.normalize).

  Returns:
    float32 numpy [n_fft // 2 + 1, n_mels]: `power_spectrum @ filters` gives mel energies.
  """
  fmax = sample_rate / 2.0 if fmax is None else float(fmax)
  fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
  # n_mels + 2 edges equally spaced in mels: filter i rises from edge i, peaks at i + 1 and
  # falls to zero at i + 2.
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
  widths = np.diff(edges)
  ramps = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freq]
  rising = -ramps[:-2] / widths[:-1, None]
  falling = ramps[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, n_freq]
  if norm == 'slaney':
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
  elif norm is not None:
    if isinstance(norm, str):
      raise ValueError(f"mel_filterbank: norm must be 'slaney', None or a number, got {norm!r}")
    p = float(norm)
    size = np.max(np.abs(weights), axis=1) if np.isinf(p) else np.sum(
        np.abs(weights) ** p, axis=1) ** (1.0 / p)
    # Like librosa, an all-zero filter (more mels than FFT bins allow) is left as it is.
    size = np.where(size < np.finfo(np.float32).tiny, 1.0, size)
    weights /= size[:, None]
  return np.ascontiguousarray(weights.T, dtype=np.float32)


@functools.lru_cache(maxsize=32)
def _cached_filterbank(*args) -> np.ndarray:
  fb = mel_filterbank(*args)
  fb.setflags(write=False)
  return fb


def mel_spectrogram(audio: Array,
                    sample_rate: int,
                    n_fft: int,
                    hop_length: int,
                    n_mels: int,
                    win_length: Optional[int] = None,
                    window: str = 'hann',
                    center: bool = True,
                    pad_mode: str = 'constant',
                    power: float = 2.0,
                    fmin: float = 0.0,
                    fmax: Optional[float] = None,
                    htk: bool = False,
                    norm: MelNorm = 'slaney',
                    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> Array:
  """Mel spectrogram, matching `librosa.feature.melspectrogram` (transposed).

  Args:
    audio: [..., samples] waveform.
    sample_rate, n_fft, hop_length, n_mels, fmin, fmax, htk, norm: see stft / mel_filterbank.
    win_length, window, center, pad_mode: see stft.
    power: 2 for mel energies (librosa's default), 1 for mel magnitudes.
    precision: of the filterbank matmul. HIGHEST by default: TPUs' DEFAULT precision rounds
      float32 operands to bf16 (~0.4% error per value), which log-mel losses would then chase.

  Returns:
    float32 [..., frames, n_mels] (librosa's layout is [n_mels, frames]).
  """
  spec = magnitude_spectrogram(audio, n_fft, hop_length, win_length, window, center, pad_mode,
                               power)
  fb = _cached_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm)
  return jnp.matmul(spec, jnp.asarray(fb), precision=precision)


def log_compress(mel: Array,
                 log: str = 'log',
                 amin: float = 1e-5,
                 ref: float = 1.0,
                 top_db: Optional[float] = None) -> Array:
  """Log of a (mel) spectrogram [..., frames, bins], floored at `amin`.

  Args:
    mel: non-negative spectrogram, frames-major.
    log: 'log' for ln(max(mel, amin)) (the usual model input and loss scale); 'db' for
      librosa.power_to_db: 10 log10(max(mel, amin)) - 10 log10(max(ref, amin)). 'db' is 10 log10
      whatever the spectrogram is, as in librosa, so it is true dB only for power spectra.
    amin: floor before the log; keeps silence finite (and its gradient zero).
    ref: reference level for 'db' (0 dB).
    top_db: if set, clip to at most top_db below the peak. The peak is taken per example (over
      its frames and bins, the last two axes), which is librosa's global max for one example.

  Returns:
    Array shaped like `mel`.
  """
  if log == 'log':
    out = jnp.log(jnp.maximum(mel, amin))
    db_per_unit = 10.0 / np.log(10.0)  # ln(x) = log10(x) * ln(10): 1 unit is 4.34 dB
  elif log == 'db':
    out = 10.0 * jnp.log10(jnp.maximum(mel, amin)) - 10.0 * np.log10(max(ref, amin))
    db_per_unit = 1.0
  else:
    raise ValueError(f"log must be 'log' or 'db', got {log!r}")
  if top_db is not None:
    peak = jnp.max(out, axis=(-2, -1), keepdims=True)
    out = jnp.maximum(out, peak - top_db / db_per_unit)
  return out


def log_mel_spectrogram(audio: Array,
                        sample_rate: int,
                        n_fft: int,
                        hop_length: int,
                        n_mels: int,
                        win_length: Optional[int] = None,
                        window: str = 'hann',
                        center: bool = True,
                        pad_mode: str = 'constant',
                        power: float = 2.0,
                        fmin: float = 0.0,
                        fmax: Optional[float] = None,
                        htk: bool = False,
                        norm: MelNorm = 'slaney',
                        log: str = 'log',
                        amin: float = 1e-5,
                        ref: float = 1.0,
                        top_db: Optional[float] = None) -> Array:
  """`log_compress(mel_spectrogram(...))`: float32 [..., frames, n_mels].

  With log='db', amin=1e-10, top_db=80 this is librosa.power_to_db(melspectrogram(...)).T.
  """
  mel = mel_spectrogram(audio, sample_rate, n_fft, hop_length, n_mels, win_length, window,
                        center, pad_mode, power, fmin, fmax, htk, norm)
  return log_compress(mel, log, amin, ref, top_db)


# ---------------------------------------------------------------------------
# Configurable front-end
# ---------------------------------------------------------------------------


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LogMelFrontEnd:
  """A log-mel front-end that models take as a (gin-bound, hashable) field.

  Defaults are for 24 kHz music: n_fft 1024 (43 ms, enough resolution for low notes), hop 240
  (10 ms, 100 frames/s). 100 Hz is the usual front-end rate (w2v-BERT-style encoders
  subsample it 4x to the 25 Hz semantic token rate) and exactly twice the codec's 50 Hz frame
  rate, so two mel frames line up with each codec frame. 128 Slaney mel bands up to Nyquist,
  natural log of power floored at 1e-5 (-50 dB).

  Attributes:
    sample_rate: expected input rate (Hz); resample before, this does not.
    n_fft, hop_length, win_length, window, center, pad_mode: see `stft`.
    n_mels, fmin, fmax, htk, norm: see `mel_filterbank`.
    power: 2 for power, 1 for magnitude mel spectrograms.
    log: 'log' or 'db' (see `log_compress`).
    log_floor: `amin` of log_compress.
    top_db: see log_compress; None for no clipping.
  """
  sample_rate: int = 24000
  n_fft: int = 1024
  hop_length: int = 240
  win_length: Optional[int] = None
  window: str = 'hann'
  n_mels: int = 128
  fmin: float = 0.0
  fmax: Optional[float] = None
  htk: bool = False
  norm: MelNorm = 'slaney'
  power: float = 2.0
  log: str = 'log'
  log_floor: float = 1e-5
  top_db: Optional[float] = None
  center: bool = True
  pad_mode: str = 'constant'

  def __call__(self, audio: Array) -> Array:
    """[..., samples] at `sample_rate` -> float32 [..., num_frames(samples), n_mels]."""
    return log_mel_spectrogram(audio, self.sample_rate, self.n_fft, self.hop_length,
                               self.n_mels, self.win_length, self.window, self.center,
                               self.pad_mode, self.power, self.fmin, self.fmax, self.htk,
                               self.norm, self.log, self.log_floor, 1.0, self.top_db)

  def num_frames(self, num_samples: int) -> int:
    """Frames produced for `num_samples` input samples (1 + samples // hop when centred)."""
    return _num_frames(num_samples, self.n_fft, self.hop_length, self.center)

  @property
  def frame_rate(self) -> float:
    """Frames per second."""
    return self.sample_rate / self.hop_length
