"""Fréchet distance, FAD and FAD-inf against references and known cases."""
import numpy as np
import pytest
import scipy.linalg

from musiclm_jax.evaluation import frechet


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """The usual implementation (pytorch-fid / the FAD paper's code): sqrtm of sigma1 sigma2."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def correlated_gaussian(rng, n, d, shift=0.0):
  mixing = rng.standard_normal((d, d)) / np.sqrt(d)
  return rng.standard_normal((n, d)) @ mixing + shift


def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(0)
  a = correlated_gaussian(rng, 400, 16)
  b = correlated_gaussian(rng, 300, 16, shift=0.3) * 1.5
  fit_a, fit_b = frechet.gaussian_fit(a), frechet.gaussian_fit(b)
  expected = scipy_frechet_distance(fit_a.mean, fit_a.covariance, fit_b.mean, fit_b.covariance)
  np.testing.assert_allclose(frechet.fad(a, b), expected, rtol=1e-9)
  np.testing.assert_allclose(frechet.fad(b, a), expected, rtol=1e-9)  # symmetric


def test_frechet_distance_of_commuting_covariances_is_exact():
  # Diagonal covariances, some singular: FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  var_a = np.array([4.0, 1.0, 0.0, 0.25, 0.0])
  var_b = np.array([1.0, 1.0, 9.0, 0.0, 0.0])
  mean_a, mean_b = np.arange(5.0), np.arange(5.0) + np.array([1.0, 0, 0, 2.0, 0])
  expected = 5.0 + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
  got = frechet.frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b))
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  # The same in a rotated basis (non-diagonal, still commuting).
  rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((5, 5)))
  got = frechet.frechet_distance(rotation @ mean_a, rotation @ np.diag(var_a) @ rotation.T,
                                 rotation @ mean_b, rotation @ np.diag(var_b) @ rotation.T)
  # Round-off eigenvalues ~1e-16 of the singular directions have square roots ~1e-8.
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_fad_of_a_set_with_itself_is_zero_even_when_singular():
  rng = np.random.default_rng(2)
  full_rank = correlated_gaussian(rng, 200, 8)
  assert frechet.fad(full_rank, full_rank) == pytest.approx(0.0, abs=1e-9)
  rank_deficient = correlated_gaussian(rng, 10, 64)  # 10 samples in 64 dimensions
  assert frechet.fad(rank_deficient, rank_deficient) == pytest.approx(0.0, abs=1e-8)


def test_fad_grows_with_a_mean_shift_as_its_square():
  rng = np.random.default_rng(3)
  x = correlated_gaussian(rng, 300, 12)
  direction = rng.standard_normal(12)
  direction /= np.linalg.norm(direction)
  scores = [frechet.fad(x, x + s * direction) for s in (0.0, 0.5, 1.0, 2.0)]
  # Shifting leaves the covariance as it is, so FAD is exactly |shift|^2.
  np.testing.assert_allclose(scores, [0.0, 0.25, 1.0, 4.0], atol=1e-9)


def test_fad_rejects_bad_inputs():
  good = np.zeros((5, 3))
  with pytest.raises(ValueError, match='at least 2'):
    frechet.fad(np.zeros((1, 3)), good)
  with pytest.raises(ValueError, match='NaN/inf'):
    frechet.fad(good, np.where(np.eye(5, 3) > 0, np.nan, 0.0))
  with pytest.raises(ValueError, match='NaN/inf'):
    frechet.fad(np.full((5, 3), np.inf), good)
  with pytest.raises(ValueError, match='dimensions differ'):
    frechet.fad(good, np.zeros((5, 4)))
  with pytest.raises(ValueError, match='matrix'):
    frechet.fad(np.zeros(5), good)
  with pytest.raises(ValueError, match='dimension mismatch'):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


@pytest.fixture(scope='module')
def shifted_gaussians():
  """Reference N(0, I) (large enough to be exact) and an evaluated pool N(mu, I), |mu|^2 = 1."""
  rng = np.random.default_rng(4)
  d = 8
  mu = np.zeros(d)
  mu[0] = 1.0
  return rng.standard_normal((20000, d)), rng.standard_normal((4000, d)) + mu


def test_fad_infinity_removes_the_small_sample_bias(shifted_gaussians):
  reference, pool = shifted_gaussians
  fit = frechet.fad_infinity_fit(reference, pool, min_n=50, max_n=1000, steps=20, seed=0)
  small_sample = frechet.fad(reference, pool[:50])
  assert small_sample > 1.1  # FAD at N=50 is biased well above the true 1.0
  assert fit.value == pytest.approx(1.0, abs=0.05)
  # The mean-shift term makes single draws noisy (std ~ 2 / sqrt(N)), so the line fits loosely.
  assert fit.slope > 0 and fit.r2 > 0.5
  assert fit.sizes[0] == 50 and fit.sizes[-1] == 1000 and len(fit.fads) == len(fit.sizes)
  # Seeded: the same call gives the same number; another seed a nearby one.
  again = frechet.fad_infinity(reference, pool, min_n=50, max_n=1000, steps=20, seed=0)
  assert again == fit.value
  other = frechet.fad_infinity(reference, pool, min_n=50, max_n=1000, steps=20, seed=1)
  assert other == pytest.approx(1.0, abs=0.05)


def test_fad_infinity_of_equal_distributions_is_near_zero(shifted_gaussians):
  reference, pool = shifted_gaussians
  same = pool - pool.mean(axis=0)  # N(0, I) like the reference
  fit = frechet.fad_infinity_fit(reference, same, min_n=50, max_n=1000, steps=20, seed=0)
  assert frechet.fad(reference, same[:50]) > 0.1
  assert abs(fit.value) < 0.02 and fit.r2 > 0.9


def test_fad_infinity_rejects_bad_settings(shifted_gaussians):
  reference, pool = shifted_gaussians
  with pytest.raises(ValueError, match='min_n'):
    frechet.fad_infinity(reference, pool[:10], min_n=10, max_n=10)
  with pytest.raises(ValueError, match='steps'):
    frechet.fad_infinity(reference, pool, steps=1)
  with pytest.raises(ValueError, match='replace=True'):
    frechet.fad_infinity(reference, pool[:100], max_n=200, replace=False)
  with pytest.raises(ValueError, match='dimensions differ'):
    frechet.fad_infinity(reference, pool[:, :4])


def test_command_line_reads_npy_files(tmp_path, capsys):
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal((60, 4)), rng.standard_normal((60, 4)) + 1.0
  np.save(tmp_path / 'a.npy', a)
  np.save(tmp_path / 'b.npy', b)
  assert frechet.main([str(tmp_path / 'a.npy'), str(tmp_path / 'b.npy'), '--infinity']) == 0
  out = capsys.readouterr().out
  assert f'FAD: {frechet.fad(a, b):.6g}' in out and 'FAD-inf:' in out
