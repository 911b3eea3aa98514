"""Codec training losses (adversarial, feature matching, multi-scale mel) and evaluation metrics."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.audio import features

Array = jax.Array


# ---------------------------------------------------------------------------
# Batch reductions
# ---------------------------------------------------------------------------


def _per_example_mean(x: Array) -> Array:
  """[batch, ...] -> [batch]: float32 mean over every axis but the first."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def _batch_mean(per_example: Array, weights: Optional[Array]) -> Array:
  """Weighted mean over the batch of per-example values [batch].

  Args:
    per_example: [batch] float32.
    weights: None (plain mean) or [batch] non-negative weights, e.g. 0 for padding rows of an
      evaluation batch; an all-zero weight vector gives 0, not NaN.

  Returns:
    A float32 scalar.
  """
  if weights is None:
    return jnp.mean(per_example)
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def _mean_over(values: Sequence[Array]) -> Array:
  if not values:
    raise ValueError('no discriminator outputs given')
  return sum(values) / len(values)


# ---------------------------------------------------------------------------
# Adversarial losses
# ---------------------------------------------------------------------------


def hinge_discriminator_loss(real_logits_list: Sequence[Array],
                             fake_logits_list: Sequence[Array],
                             weights: Optional[Array] = None) -> Array:
  """SoundStream's hinge loss for the discriminators.

  mean over discriminators k of  mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(G(x)))),
  each mean over batch and logits.

  Args:
    real_logits_list: per discriminator, logits [batch, ...] of real audio.
    fake_logits_list: the same for generated audio (stop its gradient into the generator
      before calling, as the discriminator step should not train the generator).
    weights: optional [batch] example weights (0 for padding rows).

  Returns:
    A float32 scalar.
  """
  _check_pairs(real_logits_list, fake_logits_list)
  return _mean_over([
      _batch_mean(_per_example_mean(jax.nn.relu(1.0 - jnp.asarray(r, jnp.float32))), weights) +
      _batch_mean(_per_example_mean(jax.nn.relu(1.0 + jnp.asarray(f, jnp.float32))), weights)
      for r, f in zip(real_logits_list, fake_logits_list)])


def hinge_generator_loss(fake_logits_list: Sequence[Array],
                         weights: Optional[Array] = None) -> Array:
  """SoundStream's adversarial loss for the generator: mean over k of mean(relu(1 - D_k(G(x)))).

  Args:
    fake_logits_list: per discriminator, logits [batch, ...] of generated audio.
    weights: optional [batch] example weights.

  Returns:
    A float32 scalar.
  """
  return _mean_over([
      _batch_mean(_per_example_mean(jax.nn.relu(1.0 - jnp.asarray(f, jnp.float32))), weights)
      for f in fake_logits_list])


def least_squares_discriminator_loss(real_logits_list: Sequence[Array],
                                     fake_logits_list: Sequence[Array],
                                     weights: Optional[Array] = None) -> Array:
  """LSGAN (HiFi-GAN, MelGAN variants): mean over k of mean((1 - D_k(x))^2) + mean(D_k(G(x))^2).
  """
  _check_pairs(real_logits_list, fake_logits_list)
  return _mean_over([
      _batch_mean(_per_example_mean(jnp.square(1.0 - jnp.asarray(r, jnp.float32))), weights) +
      _batch_mean(_per_example_mean(jnp.square(jnp.asarray(f, jnp.float32))), weights)
      for r, f in zip(real_logits_list, fake_logits_list)])


def least_squares_generator_loss(fake_logits_list: Sequence[Array],
                                 weights: Optional[Array] = None) -> Array:
  """LSGAN generator loss: mean over k of mean((1 - D_k(G(x)))^2)."""
  return _mean_over([
      _batch_mean(_per_example_mean(jnp.square(1.0 - jnp.asarray(f, jnp.float32))), weights)
      for f in fake_logits_list])


def _check_pairs(real: Sequence, fake: Sequence) -> None:
  if len(real) != len(fake):
    raise ValueError(f'{len(real)} real but {len(fake)} fake discriminator outputs')


# ---------------------------------------------------------------------------
# Feature matching
# ---------------------------------------------------------------------------


def feature_matching_loss(real_feats_list: Sequence[Sequence[Array]],
                          fake_feats_list: Sequence[Sequence[Array]],
                          weights: Optional[Array] = None,
                          eps: float = 1e-6) -> Array:
  """Relative L1 distance between the discriminators' activations on real and generated audio.

  For discriminator k and layer l:  mean|R_kl - F_kl| / (mean|R_kl| + eps), means over batch
  and activation (EnCodec's normalisation: every layer weighs alike whatever its scale). The
  loss is the mean over all (k, l) pairs. Real activations are constants (stop_gradient): the
  generator moves towards them, the discriminator is not trained by this loss.

  Args:
    real_feats_list: per discriminator, its list of feature maps [batch, ...] of real audio.
    fake_feats_list: the same for generated audio.
    weights: optional [batch] example weights; both means are then weighted means.
    eps: keeps an all-zero real layer (dead units, silence) finite.

  Returns:
    A float32 scalar: 0 for identical features.
  """
  _check_pairs(real_feats_list, fake_feats_list)
  terms = []
  for real_feats, fake_feats in zip(real_feats_list, fake_feats_list):
    _check_pairs(real_feats, fake_feats)
    for real, fake in zip(real_feats, fake_feats):
      real = jax.lax.stop_gradient(jnp.asarray(real, jnp.float32))
      fake = jnp.asarray(fake, jnp.float32)
      distance = _batch_mean(_per_example_mean(jnp.abs(real - fake)), weights)
      scale = _batch_mean(_per_example_mean(jnp.abs(real)), weights)
      terms.append(distance / (scale + eps))
  return _mean_over(terms)


# ---------------------------------------------------------------------------
# Reconstruction losses
# ---------------------------------------------------------------------------


def waveform_l1(target: Array, estimate: Array, weights: Optional[Array] = None) -> Array:
  """Mean absolute sample difference of [batch, samples] waveforms (float32 scalar)."""
  diff = jnp.abs(jnp.asarray(target, jnp.float32) - jnp.asarray(estimate, jnp.float32))
  return _batch_mean(_per_example_mean(diff), weights)


@functools.lru_cache(maxsize=128)
def mels_for_scale(sample_rate: int, n_fft: int, n_mels: int) -> int:
  """Mel bands used at one scale: at most n_mels and n_fft // 4, and no empty filter.

  Short windows have few FFT bins; with as many mel bands as SoundStream's 64, the narrow
  low-frequency triangles of a 64- or 128-point FFT fall between bins and are all zero (dead
  bands that only dilute the loss). n_fft // 4 bands avoids that at 16 and 24 kHz; the search
  below makes sure of it at any rate.
  """
  m = max(1, min(n_mels, n_fft // 4))
  while m > 1 and np.any(features.mel_filterbank(sample_rate, n_fft, m).sum(axis=0) == 0):
    m -= 1
  return m


def _mel_magnitudes(audio: Array, sample_rate: int, n_fft: int, n_mels: int,
                    pad_mode: str) -> Array:
  """Slaney mel filterbank on |STFT| (power 1): [batch, frames, n_mels], hop n_fft // 4."""
  return features.mel_spectrogram(audio, sample_rate, n_fft, n_fft // 4, n_mels,
                                  pad_mode=pad_mode, power=1.0)


def _stack_pair(reference: Array, estimate: Array) -> Array:
  """Stacks two [batch, samples] signals to [2, batch, samples] for one spectrogram pass.

  One computation instead of two: half the compiled STFT and filterbank code, and the same
  rounding for both signals.
  """
  reference = jnp.asarray(reference, jnp.float32)
  estimate = jnp.asarray(estimate, jnp.float32)
  if reference.shape != estimate.shape:
    raise ValueError(f'reference {reference.shape} and estimate {estimate.shape} differ in shape')
  return jnp.stack([reference, estimate])


def _safe_norm(x: Array, axis: int) -> Array:
  """l2 norm with a zero (not NaN) gradient where x is all zero (identical or silent frames)."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


@gin.configurable
def multi_scale_mel_loss(target: Array,
                         estimate: Array,
                         sample_rate: int = 24000,
                         n_ffts: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
                         n_mels: int = 64,
                         alpha: Optional[float] = None,
                         log_eps: float = 1e-5,
                         linear_weight: float = 1.0,
                         log_distance: str = 'l2',
                         weights: Optional[Array] = None) -> Array:
  """SoundStream's multi-scale spectral reconstruction loss.

  For each scale s in n_ffts, with M_s the mel magnitudes (Slaney mel filterbank on |STFT|,
  Hann window of s samples, hop s // 4, centred, zero padded; m_s = mels_for_scale(...) bands)
  and L_s = log(M_s + log_eps), per frame t:

    ( ||M_s(x)_t - M_s(x^)_t||_1 + alpha_s ||L_s(x)_t - L_s(x^)_t||_2 ) / m_s

  averaged over frames, examples and scales. alpha_s = sqrt(s / 2) as in SoundStream unless
  `alpha` fixes it. This is SoundStream's sum over scales and frames up to constant factors
  (means instead of sums, and / m_s per frame so scales with fewer bands weigh alike).

  `log_distance='l1'` replaces the log term by DAC's: ||log10(M_s(x)_t + eps) -
  log10(M_s(x^)_t + eps)||_1 (every band weighs alike, loud or quiet, and the error is not
  squared away where it is small). With `linear_weight=0`, `alpha=1` and `log_distance='l1'`
  the loss is DAC's mel loss (mag_weight 0) over these scales, i.e. the quantity that
  `multi_scale_mel_distance` reports. The linear term favours loud, stationary content; the
  tiny codec trained on it learned to output the average spectrum and ignore its latent over
  time (README, codec section).

  Args:
    target: [batch, samples] reference waveform.
    estimate: [batch, samples] reconstruction.
    sample_rate: Hz (sets the mel scale).
    n_ffts: window (= FFT) sizes, one scale each (SoundStream: 64 .. 2048).
    n_mels: bands per scale, at most (see mels_for_scale).
    alpha: weight of the log term at every scale; None for SoundStream's sqrt(s / 2).
    log_eps: added before the log; keeps silence finite and its gradient alive.
    linear_weight: weight of the linear-magnitude L1 term (SoundStream: 1; DAC: 0).
    log_distance: 'l2' (SoundStream: l2 norm over bands of natural-log ratios) or 'l1'
      (DAC: l1 over bands of log10 ratios).
    weights: optional [batch] example weights.

  Returns:
    A float32 scalar: 0 for identical inputs; its gradient is finite, silence included.
  """
  if log_distance not in ('l1', 'l2'):
    raise ValueError(f"multi_scale_mel_loss.log_distance must be 'l1' or 'l2', got "
                     f'{log_distance!r}')
  both = _stack_pair(target, estimate)
  terms = []
  for n_fft in n_ffts:
    m = mels_for_scale(sample_rate, n_fft, n_mels)
    ref, est = _mel_magnitudes(both, sample_rate, n_fft, m, 'constant')
    a = float(np.sqrt(n_fft / 2.0)) if alpha is None else float(alpha)
    # log of the ratio rather than a difference of logs: identical spectra give exactly 0
    # (XLA may round two separately fused logs of the same value differently).
    log_ratio = jnp.log((ref + log_eps) / (est + log_eps))
    if log_distance == 'l2':
      log_term = _safe_norm(log_ratio, axis=-1)
    else:
      log_term = jnp.sum(jnp.abs(log_ratio), axis=-1) / np.log(10.0)
    per_frame = a * log_term
    if linear_weight:
      per_frame = per_frame + linear_weight * jnp.sum(jnp.abs(ref - est), axis=-1)
    per_frame = per_frame / m  # [batch, frames]
    terms.append(_batch_mean(_per_example_mean(per_frame), weights))
  return _mean_over(terms)


# ---------------------------------------------------------------------------
# Evaluation metrics (fixed definitions, not gin-configurable, so numbers stay comparable)
# ---------------------------------------------------------------------------

MEL_DISTANCE_N_FFTS = (512, 1024, 2048)
MEL_DISTANCE_N_MELS = 80
MEL_DISTANCE_FLOOR = 1e-5


def multi_scale_mel_distance(reference: Array,
                             estimate: Array,
                             sample_rate: int = 24000,
                             n_ffts: Sequence[int] = MEL_DISTANCE_N_FFTS,
                             n_mels: int = MEL_DISTANCE_N_MELS) -> Array:
  """Per-example multi-scale log-mel distance (DAC's mel distance, averaged over scales).

  For each scale s in n_ffts: M_s = mel magnitudes, i.e. an n_mels-band Slaney-normalised
  Slaney-scale mel filterbank (librosa.filters.mel defaults: fmin 0, fmax sample_rate / 2)
  applied to |STFT| (power 1; Hann window of s samples, n_fft = s, hop s // 4, centred with
  reflect padding, as audiotools' STFT in DAC). Then

    D_s = mean over frames and bands of |log10(max(M_s(ref), 1e-5)) - log10(max(M_s(est), 1e-5))|

  and the distance is the mean of D_s over scales. DAC sums over its 7 scales (32..2048 samples,
  5..320 bands) instead; this uses 3 longer scales of 80 bands and a mean, so values are in
  log10 units per band (0.1 ~ 2 dB magnitude error). Symmetric, 0 for identical inputs.

  Args:
    reference: [batch, samples] waveform (samples > max(n_ffts) // 2 for reflect padding).
    estimate: [batch, samples] waveform.
    sample_rate: Hz.
    n_ffts: scales (defaults MEL_DISTANCE_N_FFTS).
    n_mels: bands at every scale (default MEL_DISTANCE_N_MELS).

  Returns:
    float32 [batch]: per-example distances, so an evaluation can average over examples with
    padding rows masked (sum of values and count).
  """
  both = _stack_pair(reference, estimate)
  per_scale = []
  for n_fft in n_ffts:
    ref, est = _mel_magnitudes(both, sample_rate, n_fft, n_mels, 'reflect')
    # |log10(a) - log10(b)| as |log10(a / b)|: exactly 0 for identical spectra (see above).
    diff = jnp.abs(jnp.log10(jnp.maximum(ref, MEL_DISTANCE_FLOOR) /
                             jnp.maximum(est, MEL_DISTANCE_FLOOR)))
    per_scale.append(_per_example_mean(diff))
  return _mean_over(per_scale)


def si_snr(reference: Array, estimate: Array, eps: float = 1e-8) -> Array:
  """Scale-invariant signal-to-noise ratio in dB, per example (Le Roux et al., 2019: SI-SDR).

  Both signals are made zero-mean; the target is the projection of the estimate on the
  reference, s = (<est, ref> / (||ref||^2 + eps)) ref, the error e = est - s, and

    SI-SNR = 10 log10((||s||^2 + eps) / (||e||^2 + eps)).

  Scaling the estimate leaves it unchanged. The eps terms keep silence finite: a silent
  reference gives a very negative value, both silent 0 dB, identical signals a large value
  (limited by float32 rounding and eps, typically > 100 dB).

  Args:
    reference: [batch, samples] waveform.
    estimate: [batch, samples] waveform.
    eps: energy floor (in squared sample units, summed over samples).

  Returns:
    float32 [batch] in dB.
  """
  reference = jnp.asarray(reference, jnp.float32)
  estimate = jnp.asarray(estimate, jnp.float32)
  reference = reference - jnp.mean(reference, axis=-1, keepdims=True)
  estimate = estimate - jnp.mean(estimate, axis=-1, keepdims=True)
  dot = jnp.sum(estimate * reference, axis=-1, keepdims=True)
  target = dot / (jnp.sum(jnp.square(reference), axis=-1, keepdims=True) + eps) * reference
  error = estimate - target
  ratio = ((jnp.sum(jnp.square(target), axis=-1) + eps) /
           (jnp.sum(jnp.square(error), axis=-1) + eps))
  return 10.0 * jnp.log10(ratio)


def code_counts(codes: Array, codebook_size: int) -> Array:
  """Histogram of the codes at each quantizer level.

  Args:
    codes: int [batch, frames, levels]; -1 (padding) and any value outside
      [0, codebook_size) is not counted.
    codebook_size: codes per codebook.

  Returns:
    int32 [levels, codebook_size]: how often each code occurs at each level. Histograms of
    several batches add up, so an evaluation can sum them and call code_statistics_from_counts.
  """
  codes = jnp.asarray(codes, jnp.int32)
  levels = codes.shape[-1]
  flat = codes.reshape(-1, levels)
  valid = (flat >= 0) & (flat < codebook_size)
  level_index = jnp.broadcast_to(jnp.arange(levels, dtype=jnp.int32), flat.shape)
  return jnp.zeros((levels, codebook_size), jnp.int32).at[
      level_index, jnp.where(valid, flat, 0)].add(valid.astype(jnp.int32))


def code_statistics_from_counts(counts: Array) -> tuple[Array, Array]:
  """Codebook usage and perplexity from a [levels, codebook_size] histogram (see code_counts).

  Returns:
    (usage, perplexity), both float32 [levels]. usage: the fraction of the codebook used at
    least once. perplexity: exp of the entropy (nats) of the level's code distribution, from 1
    (one code) to codebook_size (all codes equally often); 1 for a level without valid codes.
  """
  counts = jnp.asarray(counts)
  codebook_size = counts.shape[-1]
  total = jnp.sum(counts, axis=-1, keepdims=True)
  p = counts.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)
  # 0 log 0 = 0: unused codes add nothing to the entropy.
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  usage = jnp.sum(counts > 0, axis=-1).astype(jnp.float32) / codebook_size
  return usage, jnp.exp(entropy)


def code_statistics(codes: Array, codebook_size: int) -> tuple[Array, Array]:
  """Per-level codebook usage and perplexity of a batch of codes.

  Args:
    codes: int [batch, frames, levels]; -1 (padding) and values outside [0, codebook_size)
      are ignored.
    codebook_size: codes per codebook.

  Returns:
    (usage, perplexity), float32 [levels] each, as code_statistics_from_counts of
    code_counts(codes, codebook_size). Per batch; for a whole evaluation set, sum code_counts
    over batches and call code_statistics_from_counts once.
  """
  return code_statistics_from_counts(code_counts(codes, codebook_size))
