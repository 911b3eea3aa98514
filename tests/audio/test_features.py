"""Tests for the JAX STFT / mel front-ends against librosa, under jit, grad and sharding."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from musiclm_jax import audio
from musiclm_jax.audio import features
from musiclm_jax.train import partitioning


def _noise(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _close(got, want, tol=2e-5):
  """float32 vs librosa (float64 input): error relative to the largest value."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < tol, err


# (n_fft, hop, win_length, center, pad_mode, samples): hops that divide n_fft and hops that
# do not, odd lengths, a window shorter than n_fft by an odd amount, reflect padding.
STFT_CASES = [
    (512, 128, None, True, 'constant', 4001),
    (1024, 240, None, True, 'constant', 4800),
    (400, 160, 251, False, 'constant', 3203),
    (256, 100, None, True, 'reflect', 1111),
    (2048, 441, None, True, 'constant', 5000),
    (64, 64, None, False, 'constant', 64),  # exactly one frame
]


@pytest.mark.parametrize('n_fft,hop,win_length,center,pad_mode,n', STFT_CASES)
def test_stft_matches_librosa(n_fft, hop, win_length, center, pad_mode, n):
  x = _noise(n)
  want = librosa.stft(x.astype(np.float64), n_fft=n_fft, hop_length=hop, win_length=win_length,
                      center=center, pad_mode=pad_mode).T
  got = features.stft(x, n_fft, hop, win_length, center=center, pad_mode=pad_mode)
  assert got.dtype == jnp.complex64
  assert got.shape == (features._num_frames(n, n_fft, hop, center), n_fft // 2 + 1)
  _close(got, want)


@pytest.mark.parametrize('frame_length,hop', [(1024, 256), (1024, 240), (400, 160), (64, 7)])
def test_frame_methods_agree(frame_length, hop):
  x = jnp.asarray(_noise((2, 3001)))
  want = librosa.util.frame(np.asarray(x), frame_length=frame_length, hop_length=hop)
  want = np.moveaxis(want, -2, -1)  # librosa: [..., frame_length, frames]
  for method in ('gather', 'slices'):
    np.testing.assert_array_equal(features._frame(x, frame_length, hop, method), want)


def test_frame_methods_same_gradient():
  x = jnp.asarray(_noise(3000))
  w = jnp.asarray(_noise((1 + (3000 - 1024) // 256, 1024), seed=1))
  grads = [jax.grad(lambda a, m=m: jnp.sum(features._frame(a, 1024, 256, m) * w))(x)
           for m in ('gather', 'slices')]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_stft_batch_axes_and_too_short():
  x = _noise((2, 3, 2000))
  got = features.stft(x, 256, 64)
  assert got.shape == (2, 3, 1 + 2000 // 64, 129)
  np.testing.assert_allclose(got[1, 2], features.stft(x[1, 2], 256, 64), rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match='n_fft'):
    features.stft(x[..., :100], 256, 64, center=False)


@pytest.mark.parametrize('power', [1.0, 2.0, 1.5])
def test_magnitude_spectrogram(power):
  x = _noise(3000)
  want = np.abs(librosa.stft(x.astype(np.float64), n_fft=512, hop_length=128)).T ** power
  _close(features.magnitude_spectrogram(x, 512, 128, power=power), want)


@pytest.mark.parametrize('htk', [False, True])
@pytest.mark.parametrize('norm', ['slaney', None, 2.0])
def test_mel_filterbank_matches_librosa(htk, norm):
  for sr, n_fft, n_mels, fmin, fmax in [(24000, 1024, 128, 0.0, None),
                                        (16000, 400, 80, 20.0, 7600.0)]:
    want = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk,
                               norm=norm).T
    got = features.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm)
    assert got.dtype == np.float32 and got.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.max(want))


def test_mel_scale_matches_librosa():
  hz = np.array([0.0, 100.0, 999.0, 1000.0, 1001.0, 4000.0, 12000.0])
  for htk in (False, True):
    np.testing.assert_allclose(features.hz_to_mel(hz, htk), librosa.hz_to_mel(hz, htk=htk),
                               rtol=1e-12)
    np.testing.assert_allclose(features.mel_to_hz(features.hz_to_mel(hz, htk), htk), hz,
                               rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize('power', [2.0, 1.0])
def test_mel_spectrogram_matches_librosa(power):
  x = _noise(6000)
  want = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=16000, n_fft=512,
                                        hop_length=160, n_mels=64, fmin=30.0, power=power).T
  got = features.mel_spectrogram(x, 16000, 512, 160, 64, fmin=30.0, power=power)
  _close(got, want)


def test_log_mel_matches_power_to_db():
  # A tone plus quiet noise: spans far more than 80 dB, so top_db clips.
  t = np.arange(8000) / 16000
  x = (np.sin(2 * np.pi * 440 * t) + 1e-4 * _noise(8000)).astype(np.float32)
  mel = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=16000, n_fft=512,
                                       hop_length=128, n_mels=40)
  want = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0).T
  got = features.log_mel_spectrogram(x, 16000, 512, 128, 40, log='db', amin=1e-10, top_db=80.0)
  assert np.min(want) == pytest.approx(np.max(want) - 80.0)  # the clip is exercised
  np.testing.assert_allclose(got, want, atol=2e-3)
  got_ln = features.log_mel_spectrogram(x, 16000, 512, 128, 40, amin=1e-5)
  np.testing.assert_allclose(got_ln, np.log(np.maximum(mel.T, 1e-5)), atol=2e-4)


def test_top_db_is_per_example():
  x = _noise((2, 4000))
  x[:, :2000] = 0.0  # silence (-100 dB at amin 1e-10), so the 30 dB clip is reached
  x[1] *= 1e-3  # 60 dB quieter: its own peak, not the batch's, sets its floor
  got = features.log_mel_spectrogram(x, 16000, 256, 128, 32, log='db', amin=1e-10, top_db=30.0)
  for i in range(2):
    np.testing.assert_allclose(got[i], features.log_mel_spectrogram(
        x[i], 16000, 256, 128, 32, log='db', amin=1e-10, top_db=30.0), atol=1e-4)
    assert float(jnp.min(got[i])) == pytest.approx(float(jnp.max(got[i])) - 30.0, abs=1e-3)
  # Natural log: the same values and the same clip, in units of ln (10 / ln 10 dB each).
  ln = features.log_mel_spectrogram(x, 16000, 256, 128, 32, log='log', amin=1e-10, top_db=30.0)
  np.testing.assert_allclose(ln * (10 / np.log(10)), got, atol=1e-3)
  with pytest.raises(ValueError, match='log'):
    features.log_compress(jnp.ones((2, 2)), log='log2')


def test_front_end_defaults_and_gin():
  fe = features.LogMelFrontEnd()
  assert audio.LogMelFrontEnd is features.LogMelFrontEnd  # the package exports it
  assert (fe.sample_rate, fe.n_fft, fe.hop_length, fe.n_mels) == (24000, 1024, 240, 128)
  assert fe.frame_rate == 100.0
  assert hash(fe) == hash(features.LogMelFrontEnd())  # usable as a static / module field
  x = _noise((2, 24000))
  out = fe(x)
  assert out.shape == (2, fe.num_frames(24000), 128) == (2, 101, 128)
  assert out.dtype == jnp.float32
  want = np.log(np.maximum(librosa.feature.melspectrogram(
      y=x[0].astype(np.float64), sr=24000, n_fft=1024, hop_length=240, n_mels=128), 1e-5)).T
  np.testing.assert_allclose(out[0], want, atol=5e-4)
  assert dataclasses.replace(fe, center=False).num_frames(24000) == 1 + (24000 - 1024) // 240
  assert dataclasses.replace(fe, center=False).num_frames(1000) == 0
  with gin.unlock_config():
    gin.parse_config('LogMelFrontEnd.n_mels = 80\nLogMelFrontEnd.hop_length = 480')
  try:
    bound = features.LogMelFrontEnd()
    assert (bound.n_mels, bound.hop_length, bound.frame_rate) == (80, 480, 50.0)
    assert bound(x).shape == (2, 51, 80)
  finally:
    gin.clear_config()


def test_jit_and_grad_are_finite():
  fe = features.LogMelFrontEnd(sample_rate=16000, n_fft=256, hop_length=64, n_mels=32)
  x = _noise((2, 2000))
  x[1, :1000] = 0.0  # silence: zero bins, where |z| and the log floor have kinks
  np.testing.assert_allclose(jax.jit(fe)(x), fe(x), atol=1e-5)

  def loss(audio, power):
    mag = features.magnitude_spectrogram(audio, 256, 64, power=power)
    return jnp.mean(fe(audio)) + jnp.mean(mag)

  for power in (1.0, 2.0):
    grad = jax.jit(jax.grad(loss), static_argnums=1)(jnp.asarray(x), power)
    assert grad.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0
  # All-silent input: the gradient is zero, not NaN.
  grad = jax.grad(loss)(jnp.zeros((1000,)), 1.0)
  assert bool(jnp.all(jnp.isfinite(grad)))
  # bf16 audio (model activations) is computed in float32.
  assert fe(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_sharded_batch_gives_same_values():
  partitioner = partitioning.Partitioner(mesh_shape=(4, 2, 1))
  fe = features.LogMelFrontEnd(sample_rate=16000, n_fft=256, hop_length=128, n_mels=32)
  x = _noise((8, 2048))
  in_sharding = partitioner.logical_sharding(('batch', None))
  out_sharding = partitioner.logical_sharding(('batch', None, None))
  fn = partitioner.partition(fe, in_shardings=(in_sharding,), out_shardings=out_sharding)
  got = fn(jax.device_put(x, in_sharding))
  assert got.sharding.is_equivalent_to(out_sharding, 3)
  assert len(got.addressable_shards) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(fe(x)), atol=1e-5)
