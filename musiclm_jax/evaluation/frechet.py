"""Fréchet Audio Distance (FAD) between embedding sets, and its unbiased extrapolation FAD-inf.

FAD (Kilgour et al., 2019) fits a Gaussian to each set of embeddings and measures

  FAD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2),

the Fréchet (2-Wasserstein) distance between the two Gaussians. The last trace is usually written
tr((S_a S_b)^1/2); S_a S_b is not symmetric, and `scipy.linalg.sqrtm` of it goes complex or
inaccurate when the covariances are singular (fewer samples than dimensions, dead ReLU units).
Here it is computed from the symmetric positive semi-definite matrix S_a^1/2 S_b S_a^1/2, which
has the same eigenvalues as S_a S_b: two symmetric eigen-decompositions in float64, negative
round-off eigenvalues clipped to zero. No epsilon is added; singular covariances are exact cases.

FAD is biased upward at finite sample size, by roughly a constant over N, so scores computed
from different numbers of clips are not comparable. FAD-inf (Chong & Forsyth, "Effectively
Unbiased FID and Inception Score and where to find them", CVPR 2020, for images; adapted to music
by Gui et al., "Adapting Frechet Audio Distance for Generative Music Evaluation", ICASSP 2024, the
fadtk toolkit) computes FAD on random subsets of the evaluated set of increasing size N, fits
FAD_N = FAD_inf + slope / N by least squares, and reports the intercept.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianFit:
  """The mean and covariance (ddof=1) of a set of embeddings, in float64."""
  mean: np.ndarray
  covariance: np.ndarray
  num_samples: int


def _check_embeddings(embeddings, name: str, min_samples: int = 2) -> np.ndarray:
  """`embeddings` as a float64 [n, d] array, or ValueError saying what is wrong with it."""
  array = np.asarray(embeddings)
  if array.ndim != 2:
    raise ValueError(f'{name}: embeddings must be a [num_samples, dim] matrix, got shape '
                     f'{array.shape}')
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f'{name}: embeddings must be numeric, got dtype {array.dtype}')
  array = array.astype(np.float64)
  if array.shape[0] < min_samples:
    raise ValueError(f'{name}: {array.shape[0]} embeddings; a covariance needs at least '
                     f'{min_samples}')
  if array.shape[1] < 1:
    raise ValueError(f'{name}: embeddings have dimension 0')
  bad = ~np.isfinite(array)
  if bad.any():
    rows = np.flatnonzero(bad.any(axis=1))
    raise ValueError(f'{name}: {int(bad.sum())} NaN/inf values in {rows.size} embeddings '
                     f'(first rows {rows[:5].tolist()})')
  return array


def gaussian_fit(embeddings, name: str = 'embeddings') -> GaussianFit:
  """The Gaussian fit (mean, unbiased covariance) of a [num_samples, dim] set of embeddings.

  Args:
    embeddings: one embedding per row; at least two rows, all values finite.
    name: what to call the set in error messages.

  Returns:
    Its GaussianFit in float64.
  """
  array = _check_embeddings(embeddings, name)
  return GaussianFit(mean=array.mean(axis=0), covariance=np.cov(array, rowvar=False, ddof=1)
                     .reshape(array.shape[1], array.shape[1]), num_samples=array.shape[0])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
  """tr((cov_a cov_b)^1/2) for covariance matrices, via tr((A^1/2 B A^1/2)^1/2)."""
  root_a = _psd_sqrt(np.asarray(cov_a, np.float64))
  middle = root_a @ np.asarray(cov_b, np.float64) @ root_a
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
  """The Fréchet distance between the Gaussians N(mean_a, cov_a) and N(mean_b, cov_b).

  Args:
    mean_a: [d] mean of the first Gaussian.
    cov_a: [d, d] covariance (symmetric positive semi-definite) of the first.
    mean_b: [d] mean of the second.
    cov_b: [d, d] covariance of the second.

  Returns:
    |mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^1/2), clipped at 0 (round-off
    can take a distance between equal Gaussians a hair below zero).
  """
  mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  d = mean_a.shape[-1] if mean_a.ndim == 1 else -1
  for name, value, shape in (('mean_a', mean_a, (d,)), ('mean_b', mean_b, (d,)),
                             ('cov_a', cov_a, (d, d)), ('cov_b', cov_b, (d, d))):
    if value.shape != shape:
      raise ValueError(f'{name} has shape {value.shape}; expected {shape} (dimension mismatch: '
                       f'mean_a {mean_a.shape}, mean_b {mean_b.shape}, cov_a {cov_a.shape}, '
                       f'cov_b {cov_b.shape})')
    if not np.isfinite(value).all():
      raise ValueError(f'{name} has NaN/inf values')
  diff = mean_a - mean_b
  distance = (diff @ diff + np.trace(cov_a) + np.trace(cov_b)
              - 2.0 * trace_sqrt_product(cov_a, cov_b))
  return float(max(distance, 0.0))


def fad_from_fits(fit_a: GaussianFit, fit_b: GaussianFit) -> float:
  """FAD between two Gaussian fits (e.g. reference statistics computed once and reused)."""
  if fit_a.mean.shape != fit_b.mean.shape:
    raise ValueError(f'embedding dimensions differ: {fit_a.mean.shape[0]} vs '
                     f'{fit_b.mean.shape[0]}')
  return frechet_distance(fit_a.mean, fit_a.covariance, fit_b.mean, fit_b.covariance)


def fad(emb_a, emb_b) -> float:
  """Fréchet Audio Distance between two sets of embeddings ([n_a, d] and [n_b, d]).

  Args:
    emb_a: one embedding per row (e.g. per clip); at least 2 rows, finite values.
    emb_b: the other set, same dimension d; the counts may differ.

  Returns:
    The Fréchet distance between the sets' Gaussian fits (0 for identical sets). It is biased
    upward at small sizes (see fad_infinity); compare scores computed from equal set sizes.
  """
  a = _check_embeddings(emb_a, 'emb_a')
  b = _check_embeddings(emb_b, 'emb_b')
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'embedding dimensions differ: emb_a has {a.shape[1]}, emb_b has '
                     f'{b.shape[1]}')
  return fad_from_fits(gaussian_fit(a, 'emb_a'), gaussian_fit(b, 'emb_b'))


@dataclasses.dataclass(frozen=True)
class FadInfinityFit:
  """The regression behind FAD-inf.

  Attributes:
    value: FAD-inf, the intercept of FAD_N = value + slope / N.
    slope: the fitted slope (the size of the 1/N bias).
    r2: coefficient of determination of the fit (close to 1 when FAD_N is linear in 1/N).
    sizes: the subset sizes N used.
    fads: FAD_N at each size.
  """
  value: float
  slope: float
  r2: float
  sizes: tuple[int, ...]
  fads: tuple[float, ...]


def fad_infinity_fit(reference, evaluated, *, min_n: Optional[int] = None,
                     max_n: Optional[int] = None, steps: int = 25, seed: int = 0,
                     replace: bool = True) -> FadInfinityFit:
  """FAD-inf of `evaluated` against `reference`, with the regression behind it.

  Follows fadtk (Gui et al. 2024): the reference statistics use the whole reference set; for
  `steps` sizes N evenly spaced from min_n to max_n, N evaluated embeddings are drawn at random
  (with replacement by default, as fadtk does, so N may exceed the set's size), FAD_N is computed
  against the reference, and FAD_N = FAD_inf + slope / N is fitted by least squares.

  The extrapolation removes the 1/N bias of drawing N samples from the evaluated pool; the pool
  itself should be large (hundreds of clips or more) for the intercept to be trustworthy, and
  `r2` tells how well the line fits.

  Args:
    reference: [n_ref, d] reference embeddings (e.g. real music).
    evaluated: [n_eval, d] embeddings of the audio being scored (e.g. generated).
    min_n: smallest subset size (default: max(2, n_eval // 5)).
    max_n: largest subset size (default: n_eval).
    steps: number of subset sizes (at least 2).
    seed: seeds the subset draws; the same inputs and seed give the same result.
    replace: draw with replacement (fadtk) or without (then max_n <= n_eval).

  Returns:
    The FadInfinityFit.
  """
  ref = _check_embeddings(reference, 'reference')
  ev = _check_embeddings(evaluated, 'evaluated')
  if ref.shape[1] != ev.shape[1]:
    raise ValueError(f'embedding dimensions differ: reference has {ref.shape[1]}, evaluated has '
                     f'{ev.shape[1]}')
  n_eval = ev.shape[0]
  max_n = n_eval if max_n is None else int(max_n)
  min_n = max(2, n_eval // 5) if min_n is None else int(min_n)
  if steps < 2:
    raise ValueError(f'steps={steps}: a line needs at least 2 subset sizes')
  if not 2 <= min_n < max_n:
    raise ValueError(f'need 2 <= min_n < max_n, got min_n={min_n}, max_n={max_n} '
                     f'({n_eval} evaluated embeddings)')
  if not replace and max_n > n_eval:
    raise ValueError(f'max_n={max_n} exceeds the {n_eval} evaluated embeddings; draw with '
                     'replace=True or lower max_n')
  sizes = sorted(set(int(round(n)) for n in np.linspace(min_n, max_n, steps)))
  ref_fit = gaussian_fit(ref, 'reference')
  rng = np.random.default_rng(seed)
  fads = []
  for n in sizes:
    subset = ev[rng.choice(n_eval, size=n, replace=replace)]
    fads.append(fad_from_fits(ref_fit, gaussian_fit(subset, 'evaluated subset')))
  inverse = 1.0 / np.asarray(sizes, np.float64)
  scores = np.asarray(fads)
  slope, intercept = np.polyfit(inverse, scores, 1)
  residual = scores - (intercept + slope * inverse)
  total = ((scores - scores.mean()) ** 2).sum()
  r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else 1.0
  return FadInfinityFit(value=float(intercept), slope=float(slope), r2=float(r2),
                        sizes=tuple(sizes), fads=tuple(float(f) for f in fads))


def fad_infinity(reference, evaluated, **kwargs) -> float:
  """FAD-inf (the intercept of FAD_N against 1/N); kwargs as fad_infinity_fit (seeded)."""
  return fad_infinity_fit(reference, evaluated, **kwargs).value


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m musiclm_jax.evaluation.frechet A.npy B.npy`: FAD (and FAD-inf) of two sets."""
  parser = argparse.ArgumentParser(
      prog='python -m musiclm_jax.evaluation.frechet',
      description='FAD between two [n, d] embedding matrices saved with numpy.save (e.g. by '
                  'MusicnnEmbedder.embed); the second is the evaluated set for FAD-inf.')
  parser.add_argument('reference')
  parser.add_argument('evaluated')
  parser.add_argument('--infinity', action='store_true', help='also report FAD-inf')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  # allow_pickle=False: embeddings are plain arrays, and a pickle could run code.
  ref = np.load(args.reference, allow_pickle=False)
  ev = np.load(args.evaluated, allow_pickle=False)
  print(f'FAD: {fad(ref, ev):.6g}  ({ref.shape[0]} vs {ev.shape[0]} embeddings, d={ref.shape[1]})')
  if args.infinity:
    fit = fad_infinity_fit(ref, ev, seed=args.seed)
    print(f'FAD-inf: {fit.value:.6g}  (slope {fit.slope:.4g}, r2 {fit.r2:.3f}, N from '
          f'{fit.sizes[0]} to {fit.sizes[-1]})')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
