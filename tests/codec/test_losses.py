"""Tests for the codec losses and evaluation metrics against hand and numpy/librosa references."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from musiclm_jax.audio import features
from musiclm_jax.codec import losses

SAMPLE_RATE = 24000
SAMPLES = 4800  # 0.2 s: every jitted function below sees this one shape
BATCH = 2


def _tone(seed=0):
  """[BATCH, SAMPLES] decaying harmonic tones plus a little noise: spectra with structure."""
  rng = np.random.default_rng(seed)
  t = np.arange(SAMPLES) / SAMPLE_RATE
  rows = []
  for f0 in (220.0, 330.0):
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
    rows.append(0.3 * x * np.exp(-2 * t) + 0.01 * rng.standard_normal(SAMPLES))
  return np.stack(rows).astype(np.float32)


def _noise(seed, scale=1.0):
  return scale * np.random.default_rng(seed).standard_normal((BATCH, SAMPLES)).astype(np.float32)


# Shared jitted functions (one compile each for the shape above).
_mel_loss_and_grad = jax.jit(jax.value_and_grad(losses.multi_scale_mel_loss, argnums=1))
_mel_distance = jax.jit(losses.multi_scale_mel_distance)
_si_snr = jax.jit(losses.si_snr)


# ---------------------------------------------------------------------------
# Adversarial and feature matching
# ---------------------------------------------------------------------------


def test_hinge_losses_by_hand():
  real = [jnp.array([[0.5, 2.0], [-1.0, 0.0]]), jnp.array([[3.0], [0.2]])]
  fake = [jnp.array([[-2.0, 0.5], [0.0, -0.5]]), jnp.array([[-0.5], [1.0]])]
  # Disc 0: real relu(1 - r) = [.5, 0, 2, 1] -> .875; fake relu(1 + f) = [0, 1.5, 1, .5] -> .75.
  # Disc 1: real [0, .8] -> .4; fake [.5, 2] -> 1.25.
  want_d = ((0.875 + 0.75) + (0.4 + 1.25)) / 2
  np.testing.assert_allclose(losses.hinge_discriminator_loss(real, fake), want_d, rtol=1e-6)
  # Generator: relu(1 - f): disc 0 [3, .5, 1, 1.5] -> 1.5; disc 1 [1.5, 0] -> .75.
  np.testing.assert_allclose(losses.hinge_generator_loss(fake), (1.5 + 0.75) / 2, rtol=1e-6)
  # Least squares: (1 - r)^2 and f^2; generator (1 - f)^2.
  want_ls = ((np.mean([.25, 1, 4, 1]) + np.mean([4, .25, 0, .25])) +
             (np.mean([4, .64]) + np.mean([.25, 1]))) / 2
  np.testing.assert_allclose(losses.least_squares_discriminator_loss(real, fake), want_ls,
                             rtol=1e-6)
  want_lg = (np.mean([9, .25, 1, 2.25]) + np.mean([2.25, 0])) / 2
  np.testing.assert_allclose(losses.least_squares_generator_loss(fake), want_lg, rtol=1e-6)
  # Example weights: [1, 0] is the first example alone.
  w = jnp.array([1.0, 0.0])
  first = [f[:1] for f in fake]
  np.testing.assert_allclose(losses.hinge_generator_loss(fake, w),
                             losses.hinge_generator_loss(first), rtol=1e-6)
  with pytest.raises(ValueError, match='real but'):
    losses.hinge_discriminator_loss(real, fake[:1])


def test_feature_matching():
  rng = np.random.default_rng(0)
  real = [[jnp.asarray(rng.standard_normal((2, 5, 3))), jnp.asarray(rng.standard_normal((2, 7)))],
          [jnp.asarray(100 * rng.standard_normal((2, 4)))]]
  assert float(losses.feature_matching_loss(real, real)) == 0.0
  fake = jax.tree_util.tree_map(lambda r: r + 0.1 * jnp.std(r), real)
  loss = float(losses.feature_matching_loss(real, fake))
  assert loss > 0
  # Relative: a layer of 100x scale contributes like the others; the same relative offset
  # everywhere gives 0.1 std / mean|r| per layer.
  want = np.mean([0.1 * np.std(r) / np.mean(np.abs(r)) for feats in real for r in feats])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Real features are constants: no gradient flows into them.
  g_real, g_fake = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(real, fake)
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(g_real))
  assert all(np.any(g != 0) for g in jax.tree_util.tree_leaves(g_fake))
  # All-zero real activations (dead units) stay finite.
  zeros = [[jnp.zeros((2, 3))]]
  assert np.isfinite(losses.feature_matching_loss(zeros, [[jnp.ones((2, 3))]]))


def test_waveform_l1():
  a, b = _noise(0), _noise(1)
  np.testing.assert_allclose(losses.waveform_l1(a, b), np.mean(np.abs(a - b)), rtol=1e-5)
  np.testing.assert_allclose(losses.waveform_l1(a, b, jnp.array([0.0, 2.0])),
                             np.mean(np.abs(a[1] - b[1])), rtol=1e-5)


# ---------------------------------------------------------------------------
# Multi-scale mel loss
# ---------------------------------------------------------------------------


def test_mels_for_scale_has_no_empty_filters():
  assert [losses.mels_for_scale(24000, n, 64) for n in (64, 128, 256, 512, 2048)] == [
      16, 32, 64, 64, 64]
  for sr in (16000, 24000, 48000):
    for n in (64, 128, 256, 512, 1024, 2048):
      m = losses.mels_for_scale(sr, n, 64)
      assert 1 <= m <= min(64, n // 4)
      assert np.all(features.mel_filterbank(sr, n, m).sum(axis=0) > 0)


def test_multi_scale_mel_loss():
  target = _tone()
  loss, grad = _mel_loss_and_grad(target, target)
  assert float(loss) == 0.0 and np.all(np.isfinite(grad))
  values = []
  for sigma in (0.003, 0.03, 0.3):
    loss, grad = _mel_loss_and_grad(target, target + _noise(1, sigma))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    values.append(float(loss))
  assert 0 < values[0] < values[1] < values[2]
  # Silence, as target, estimate or both: finite values and gradients.
  silent = np.zeros_like(target)
  for t, e in ((silent, silent), (silent, target), (target, silent)):
    loss, grad = _mel_loss_and_grad(t, e)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_multi_scale_mel_loss_terms_by_hand():
  """One scale, alpha fixed: the per-frame formula written out with librosa's mel spectrogram."""
  target, estimate = _tone(), _tone() + _noise(2, 0.05)
  got = losses.multi_scale_mel_loss(target, estimate, n_ffts=(256,), alpha=2.0)
  def mel(x):
    return librosa.feature.melspectrogram(y=x.astype(np.float64), sr=SAMPLE_RATE, n_fft=256,
                                          hop_length=64, n_mels=64, power=1.0).T
  per_example = []
  for t, e in zip(target, estimate):
    mt, me = mel(t), mel(e)
    l1 = np.abs(mt - me).sum(-1)
    l2 = np.sqrt(np.square(np.log(mt + 1e-5) - np.log(me + 1e-5)).sum(-1))
    per_example.append(np.mean((l1 + 2.0 * l2) / 64))
  np.testing.assert_allclose(got, np.mean(per_example), rtol=2e-3)
  # DAC's form: no linear term, mean over bands of |log10 ratio|.
  got = losses.multi_scale_mel_loss(target, estimate, n_ffts=(256,), alpha=1.0,
                                    linear_weight=0.0, log_distance='l1')
  want = np.mean([np.mean(np.abs(np.log10(mel(t) + 1e-5) - np.log10(mel(e) + 1e-5)))
                  for t, e in zip(target, estimate)])
  np.testing.assert_allclose(got, want, rtol=2e-3)
  with pytest.raises(ValueError, match='log_distance'):
    losses.multi_scale_mel_loss(target, estimate, log_distance='l3')


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def test_mel_distance_properties():
  ref = _tone()
  d0 = np.asarray(_mel_distance(ref, ref))
  assert d0.shape == (BATCH,) and np.all(d0 == 0)
  est = ref + _noise(3, 0.01)
  np.testing.assert_allclose(_mel_distance(ref, est), _mel_distance(est, ref), rtol=1e-6)
  distances = [np.asarray(_mel_distance(ref, ref + _noise(3, s))) for s in (0.001, 0.01, 0.1)]
  assert np.all(0 < distances[0]) and np.all(distances[0] < distances[1])
  assert np.all(distances[1] < distances[2])
  # Per example: swapping the rows of both swaps the values.
  np.testing.assert_allclose(_mel_distance(ref[::-1], est[::-1]), _mel_distance(ref, est)[::-1],
                             rtol=1e-6)


def test_mel_distance_matches_librosa_one_scale():
  ref, est = _tone(), _tone() + _noise(4, 0.02)
  got = np.asarray(losses.multi_scale_mel_distance(ref, est, n_ffts=(1024,)))

  def log_mel(x):
    mel = librosa.feature.melspectrogram(y=x.astype(np.float64), sr=SAMPLE_RATE, n_fft=1024,
                                         hop_length=256, n_mels=80, power=1.0, center=True,
                                         pad_mode='reflect', fmin=0.0)
    return np.log10(np.maximum(mel, 1e-5))

  want = [np.mean(np.abs(log_mel(r) - log_mel(e))) for r, e in zip(ref, est)]
  np.testing.assert_allclose(got, want, rtol=2e-3)


def _si_snr_numpy(ref, est, eps=1e-8):
  ref = ref.astype(np.float64) - ref.mean(-1, keepdims=True)
  est = est.astype(np.float64) - est.mean(-1, keepdims=True)
  target = (est * ref).sum(-1, keepdims=True) / ((ref ** 2).sum(-1, keepdims=True) + eps) * ref
  error = est - target
  return 10 * np.log10(((target ** 2).sum(-1) + eps) / ((error ** 2).sum(-1) + eps))


def test_si_snr():
  ref = _tone()
  est = ref + _noise(5, 0.05) + 0.3  # an offset too: SI-SNR removes the mean
  got = np.asarray(_si_snr(ref, est))
  assert got.shape == (BATCH,)
  np.testing.assert_allclose(got, _si_snr_numpy(ref, est), atol=1e-3)
  np.testing.assert_allclose(_si_snr(ref, 3.0 * est), got, atol=1e-3)  # scale invariant
  assert np.all(np.asarray(_si_snr(ref, ref)) > 80)
  # Independent noise of the reference's power: about 0 dB.
  noise = _noise(6)
  noise *= np.sqrt(np.sum((ref - ref.mean(-1, keepdims=True)) ** 2, -1, keepdims=True) /
                   np.sum(noise ** 2, -1, keepdims=True))
  np.testing.assert_allclose(_si_snr(ref, ref + noise), 0.0, atol=0.5)
  # Silence never gives inf or NaN.
  silent = np.zeros_like(ref)
  for r, e in ((silent, silent), (silent, ref), (ref, silent)):
    assert np.all(np.isfinite(_si_snr(r, e)))
  np.testing.assert_allclose(_si_snr(silent, silent), 0.0)
  assert np.all(np.isfinite(jax.grad(lambda e: jnp.sum(losses.si_snr(ref, e)))(silent)))


def test_code_statistics():
  rng = np.random.default_rng(7)
  size = 8
  codes = rng.integers(0, size, (3, 10, 2))
  codes[..., 1] = rng.integers(0, 3, (3, 10))  # level 1 uses 3 codes only
  codes[0, :4] = -1  # padding, ignored
  usage, perplexity = jax.jit(losses.code_statistics, static_argnums=1)(jnp.asarray(codes), size)
  assert usage.shape == perplexity.shape == (2,)
  counts = np.asarray(losses.code_counts(jnp.asarray(codes), size))
  for level in range(2):
    valid = codes[..., level][codes[..., level] >= 0]
    assert valid.size == 26
    want = np.bincount(valid, minlength=size)
    np.testing.assert_array_equal(counts[level], want)
    p = want[want > 0] / want.sum()
    np.testing.assert_allclose(perplexity[level], np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    np.testing.assert_allclose(usage[level], np.count_nonzero(want) / size)
  np.testing.assert_allclose(usage[1], 3 / 8)
  # Out-of-range codes are not counted either.
  assert np.asarray(losses.code_counts(jnp.array([[[size], [0]]]), size)).sum() == 1
  # Histograms of several batches add up.
  _, both = losses.code_statistics_from_counts(counts + counts)
  np.testing.assert_allclose(both, perplexity, rtol=1e-6)
  # Uniform use of all codes: perplexity = codebook size; one code: 1; nothing valid: 1.
  uniform = np.tile(np.arange(size), 4).reshape(1, -1, 1)
  np.testing.assert_allclose(losses.code_statistics(uniform, size)[1], [size], rtol=1e-5)
  np.testing.assert_allclose(losses.code_statistics(np.zeros((1, 5, 1)), size)[1], [1.0])
  usage, perplexity = losses.code_statistics(-np.ones((1, 5, 1), np.int32), size)
  assert float(usage[0]) == 0.0 and float(perplexity[0]) == 1.0
