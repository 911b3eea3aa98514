"""KLD between tag posteriors against a hand-written numpy reference."""
import math

import numpy as np
import pytest

from musiclm_jax.evaluation import kld


def reference_kld(p_ref, p_gen, mode, eps=1e-6):
  """Clip by clip, tag by tag, with math's functions only."""
  totals = []
  for row_ref, row_gen in zip(p_ref, p_gen):
    row_ref = [min(max(float(v), eps), 1 - eps) for v in row_ref]
    row_gen = [min(max(float(v), eps), 1 - eps) for v in row_gen]
    if mode == 'bernoulli':
      totals.append(sum(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
                        for p, q in zip(row_ref, row_gen)))
      continue

    def softmax_of_logits(row):
      exps = [math.exp(math.log(v / (1 - v))) for v in row]  # = v / (1 - v)
      return [e / sum(exps) for e in exps]

    p_dist, q_dist = softmax_of_logits(row_ref), softmax_of_logits(row_gen)
    totals.append(sum(p * math.log(p / q) for p, q in zip(p_dist, q_dist)))
  return sum(totals) / len(totals)


@pytest.mark.parametrize('mode', kld.MODES)
def test_kld_matches_hand_reference(mode):
  rng = np.random.default_rng(0)
  p_ref = rng.uniform(0.0, 1.0, (6, 50))
  p_gen = rng.uniform(0.0, 1.0, (6, 50))
  p_gen[0, :3] = [0.0, 1.0, 1e-9]  # exercises the clipping
  np.testing.assert_allclose(kld.kl_divergence(p_ref, p_gen, mode=mode),
                             reference_kld(p_ref, p_gen, mode), rtol=1e-10)


@pytest.mark.parametrize('mode', kld.MODES)
def test_kld_is_zero_for_equal_posteriors_and_positive_otherwise(mode):
  rng = np.random.default_rng(1)
  p = rng.uniform(0.01, 0.99, (4, 10))
  assert kld.kl_divergence(p, p, mode=mode) == pytest.approx(0.0, abs=1e-12)
  per_clip = kld.per_clip_kl(p, p[::-1], mode=mode)
  assert per_clip.shape == (4,) and (per_clip > 0).all()


def test_kld_rejects_bad_inputs():
  p = np.full((3, 5), 0.5)
  with pytest.raises(ValueError, match='paired'):
    kld.kl_divergence(p, p[:2])
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    kld.kl_divergence(p, p * 3)
  with pytest.raises(ValueError, match='NaN'):
    kld.kl_divergence(p, np.where(p > 0, np.nan, p))
  with pytest.raises(ValueError, match='mode'):
    kld.kl_divergence(p, p, mode='softmax_of_probs')
  with pytest.raises(ValueError, match='num_clips'):
    kld.kl_divergence(p[0], p[0])
