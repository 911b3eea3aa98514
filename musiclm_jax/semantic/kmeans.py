"""K-means for the semantic tokenizer: k-means++ seeding, Lloyd and mini-batch k-means in JAX.

MusicLM's semantic tokens are the ids of the nearest of k = 1024 centroids fitted on w2v-BERT
embeddings. This module fits those centroids on a device mesh:

  * `kmeans_plus_plus_init`: k-means++ seeding (D^2 sampling, greedy with a few local trials).
  * `lloyd_step`: one Lloyd iteration (assign, then average); weighted.
  * `fit_kmeans`: Lloyd iterations with the points sharded over the mesh's data axis.
  * `fit_kmeans_minibatch`: mini-batch k-means (Sculley 2010) for data that does not fit in
    memory.
  * `assign` / `inertia`: nearest-centroid ids and the k-means objective.

Memory. Distances are never materialised for all points at once when a `block_size` is given:
the point axis is cut into blocks of at most `block_size` rows and scanned (`lax.scan`), so
a device holds [block_size, K] distances (and a [block_size, K] one-hot) at a time, on top of
its points and the [K, D] centroids and sums. Blocks are strided (block j holds rows
a * num_blocks + j), so a point axis split in contiguous pieces over devices stays split over
the rows of every block: the blocking also works under plain `jax.jit` with sharded points.
Without `block_size` (the default of the jittable primitives) the whole [M, K] distance matrix
is one array; under `jax.jit` with the points sharded, XLA partitions it with the points, so a
device holds [M / devices, K].

Sharding. `fit_kmeans` and `fit_kmeans_minibatch` place the points on the mesh split along
axis 0 over the data axis (padded with zero-weight rows to a multiple of its size), and keep
centroids replicated. Each Lloyd step runs the blocked statistics per shard (`jax.shard_map`)
and adds the per-cluster sums, counts and inertia across devices with one `lax.psum`.

Distances use the expansion |x|^2 - 2 x.c + |c|^2 in float32 with `Precision.HIGHEST` (no
bf16 / TF32 passes on TPU / GPU), clamped at 0.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array
ArrayLike = Union[np.ndarray, jax.Array]
AxisName = Union[str, tuple[str, ...]]

# Rows per distance block in `fit_kmeans` / `fit_kmeans_minibatch` (per device): with K = 1024
# that is 32 MiB of float32 distances plus as much again for the one-hot.
DEFAULT_BLOCK_SIZE = 8192

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class KMeansResult:
  """What a k-means fit returns.

  Attributes:
    centroids: [K, D] float32 centroids.
    inertia: sum over points of weight * squared distance to the nearest centroid.
    num_iters_run: Lloyd iterations (`fit_kmeans`) or mini-batch updates
      (`fit_kmeans_minibatch`) applied.
    counts: [K] float32 points (sums of weights) assigned to each centroid.
  """
  centroids: np.ndarray
  inertia: float
  num_iters_run: int
  counts: np.ndarray


# ----------------------------------------------------------------------------------------------
# Validation.


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _count_nonfinite(x: ArrayLike) -> tuple[int, int]:
  """(non-finite values, rows holding one) of a concrete [M, D] array."""
  if isinstance(x, np.ndarray):
    values = rows = 0
    step = max(1, (1 << 22) // max(1, x.shape[-1]))  # ~4M elements per chunk
    for start in range(0, x.shape[0], step):
      bad = ~np.isfinite(x[start:start + step])
      values += int(np.count_nonzero(bad))
      rows += int(np.count_nonzero(bad.any(axis=-1)))
    return values, rows
  bad = ~jnp.isfinite(x)
  return int(jnp.sum(bad)), int(jnp.sum(jnp.any(bad, axis=-1)))


def _check_points(points: ArrayLike, name: str = 'points') -> None:
  """Raises on a non-2-D or (when concrete) non-finite array of points."""
  if points.ndim != 2:
    raise ValueError(f'{name} must be [num_points, dim], got shape {tuple(points.shape)}')
  if _is_tracer(points) or not jnp.issubdtype(points.dtype, jnp.floating):
    return
  values, rows = _count_nonfinite(points)
  if values:
    raise ValueError(f'{name} hold {values} non-finite values (NaN or inf) in {rows} of '
                     f'{points.shape[0]} rows; drop or fix them before k-means')


def _check_centroids(centroids: ArrayLike, dim: int) -> None:
  if centroids.ndim != 2:
    raise ValueError(f'centroids must be [num_clusters, dim], got shape {tuple(centroids.shape)}')
  if centroids.shape[1] != dim:
    raise ValueError(f'dimension mismatch: points have D={dim}, centroids have '
                     f'D={centroids.shape[1]} (shape {tuple(centroids.shape)})')


def _check_weights(weights: Optional[ArrayLike], num_points: int) -> None:
  if weights is None:
    return
  if tuple(weights.shape) != (num_points,):
    raise ValueError(f'weights must be [{num_points}] (one per point), got shape '
                     f'{tuple(weights.shape)}')
  if isinstance(weights, np.ndarray):
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
      raise ValueError('weights must be finite and non-negative')


def _check_num_clusters(num_clusters: int, num_points: int, what: str = 'points') -> None:
  if int(num_clusters) != num_clusters or num_clusters < 1:
    raise ValueError(f'num_clusters must be a positive integer, got {num_clusters}')
  if num_points < num_clusters:
    raise ValueError(f'k-means needs at least num_clusters={num_clusters} {what}, got '
                     f'{num_points}')


# ----------------------------------------------------------------------------------------------
# Blocked distance statistics (pure, jittable).


def _squared_distances(x: Array, x_sq: Array, centroids: Array, c_sq: Array) -> Array:
  """[M, D] x [K, D] -> [M, K] float32 squared distances, clamped at 0."""
  cross = jnp.dot(x, centroids.T, precision=_HIGHEST, preferred_element_type=jnp.float32)
  return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _num_blocks(num_points: int, block_size: Optional[int]) -> int:
  if block_size is None or num_points <= block_size:
    return 1
  return -(-num_points // int(block_size))


def _padded_rows(num_points: int, block_size: Optional[int]) -> int:
  """Rows after padding `num_points` to `num_blocks` equal blocks (at most block_size each)."""
  nb = _num_blocks(num_points, block_size)
  return nb * -(-num_points // nb)


def _pad_rows(x: Array, rows: int) -> Array:
  if x.shape[0] == rows:
    return x
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _to_blocks(x: Array, num_blocks: int) -> Array:
  """[M, ...] -> [num_blocks, M / num_blocks, ...]; block j holds rows a * num_blocks + j."""
  x = x.reshape((x.shape[0] // num_blocks, num_blocks) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def _from_blocks(x: Array) -> Array:
  """Inverse of `_to_blocks` for [num_blocks, rows] arrays."""
  return jnp.swapaxes(x, 0, 1).reshape(-1)


def _blocked_map(fn: Callable[..., Any], block_size: Optional[int], *rows: Array) -> Any:
  """Applies fn(*blocks) -> per-row outputs over blocks of the point axis; returns [M] rows."""
  m = rows[0].shape[0]
  nb = _num_blocks(m, block_size)
  if nb == 1:
    return fn(*rows)
  padded = _padded_rows(m, block_size)
  blocks = [_to_blocks(_pad_rows(r, padded), nb) for r in rows]
  out = lax.map(lambda b: fn(*b), tuple(blocks))
  return _from_blocks(out)[:m]


def _local_stats(points: Array, weights: Array, centroids: Array,
                 block_size: Optional[int]) -> tuple[Array, Array, Array]:
  """Per-cluster weighted sums [K, D], counts [K] and the inertia of this array of points."""
  k = centroids.shape[0]
  c_sq = jnp.sum(jnp.square(centroids), axis=-1)

  def block(x, w):
    d2 = _squared_distances(x, jnp.sum(jnp.square(x), axis=-1), centroids, c_sq)
    ids = jnp.argmin(d2, axis=-1)
    min_d2 = jnp.min(d2, axis=-1)
    onehot = jax.nn.one_hot(ids, k, dtype=jnp.float32) * w[:, None]
    sums = jnp.dot(onehot.T, x, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return sums, jnp.sum(onehot, axis=0), jnp.sum(w * min_d2)

  m = points.shape[0]
  nb = _num_blocks(m, block_size)
  if nb == 1:
    return block(points, weights)
  padded = _padded_rows(m, block_size)
  xb = _to_blocks(_pad_rows(points, padded), nb)
  wb = _to_blocks(_pad_rows(weights, padded), nb)

  def body(carry, xw):
    return jax.tree.map(jnp.add, carry, block(*xw)), None

  # A zero that varies over the same shard_map axes as the inputs, so the scan carry's type
  # matches the body's output type inside shard_map.
  zero = jnp.sum(weights[:0]) + jnp.sum(points[:0]) + jnp.sum(centroids[:0])
  init = (jnp.zeros(centroids.shape, jnp.float32) + zero, jnp.zeros((k,), jnp.float32) + zero,
          zero)
  stats, _ = lax.scan(body, init, (xb, wb))
  return stats


def _update_centroids(sums: Array, counts: Array, centroids: Array) -> Array:
  """Cluster means; a cluster with no (weighted) points keeps its centroid."""
  means = sums / jnp.maximum(counts, jnp.finfo(jnp.float32).tiny)[:, None]
  return jnp.where(counts[:, None] > 0, means, centroids)


def _as_f32(x: ArrayLike) -> Array:
  return jnp.asarray(x, jnp.float32)


def _weights_or_ones(weights: Optional[ArrayLike], num_points: int) -> Array:
  if weights is None:
    return jnp.ones((num_points,), jnp.float32)
  return _as_f32(weights)


# ----------------------------------------------------------------------------------------------
# Public jittable primitives.


def lloyd_step(points: ArrayLike, centroids: ArrayLike, weights: Optional[ArrayLike] = None, *,
               block_size: Optional[int] = None,
               axis_name: Optional[AxisName] = None) -> tuple[Array, Array, Array]:
  """One Lloyd iteration: assign every point to its nearest centroid, then average.

  Jittable. The per-cluster sums and counts are reductions over the point axis: under
  `jax.jit` with `points` sharded along axis 0, XLA reduces them across devices (each device
  holds [M / devices, K] distances, or [block_size / devices, K] with `block_size`). Inside
  `jax.shard_map`, pass the mesh axis the points are split over as `axis_name` and the
  statistics are added across it with `lax.psum`.

  Args:
    points: [M, D] points (cast to float32).
    centroids: [K, D] current centroids.
    weights: optional [M] non-negative point weights; zero-weight points are ignored.
    block_size: if set, distances are computed for at most this many points at a time
      ([block_size, K] memory) by scanning over strided blocks of the point axis.
    axis_name: mesh axis (or axes) to `psum` the statistics over, inside `shard_map`.

  Returns:
    (new_centroids [K, D], inertia, counts [K]): the centroids are the weighted means of their
    assigned points (a cluster with no assigned weight keeps its old centroid); inertia is
    sum(weight * squared distance to the nearest *old* centroid); counts are the weights
    assigned to each cluster.

  Raises:
    ValueError: on shapes that are not [M, D] / [K, D] / [M], or a D mismatch.
  """
  if points.ndim != 2:
    raise ValueError(f'points must be [num_points, dim], got shape {tuple(points.shape)}')
  _check_centroids(centroids, points.shape[1])
  _check_weights(weights, points.shape[0])
  points, centroids = _as_f32(points), _as_f32(centroids)
  weights = _weights_or_ones(weights, points.shape[0])
  sums, counts, total = _local_stats(points, weights, centroids, block_size)
  if axis_name is not None:
    sums, counts, total = lax.psum((sums, counts, total), axis_name)
  return _update_centroids(sums, counts, centroids), total, counts


@functools.partial(jax.jit, static_argnames=('block_size',))
def _assign(points: Array, centroids: Array, block_size: Optional[int]) -> Array:
  c_sq = jnp.sum(jnp.square(centroids), axis=-1)

  def block(x):
    d2 = _squared_distances(x, jnp.sum(jnp.square(x), axis=-1), centroids, c_sq)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)

  return _blocked_map(block, block_size, points)


def assign(points: ArrayLike, centroids: ArrayLike, *,
           block_size: Optional[int] = None) -> Array:
  """Nearest-centroid ids: the semantic tokens of a sequence of embeddings.

  Args:
    points: [M, D] points.
    centroids: [K, D] centroids.
    block_size: if set, at most this many points' distances ([block_size, K]) at a time.

  Returns:
    int32 [M] ids in [0, K); ties go to the lowest id.

  Raises:
    ValueError: on a D mismatch, bad shapes or (for concrete inputs) non-finite points.
  """
  _check_points(points)
  _check_centroids(centroids, points.shape[1])
  return _assign(_as_f32(points), _as_f32(centroids), block_size)


@functools.partial(jax.jit, static_argnames=('block_size',))
def _inertia(points: Array, centroids: Array, weights: Array, block_size: Optional[int]) -> Array:
  return _local_stats(points, weights, centroids, block_size)[2]


def inertia(points: ArrayLike, centroids: ArrayLike, weights: Optional[ArrayLike] = None, *,
            block_size: Optional[int] = None) -> Array:
  """The k-means objective: sum(weight * squared distance to the nearest centroid).

  Args:
    points: [M, D] points.
    centroids: [K, D] centroids.
    weights: optional [M] non-negative point weights (default 1).
    block_size: if set, at most this many points' distances ([block_size, K]) at a time.

  Returns:
    float32 scalar.

  Raises:
    ValueError: on a D mismatch, bad shapes or (for concrete inputs) non-finite points.
  """
  _check_points(points)
  _check_centroids(centroids, points.shape[1])
  _check_weights(weights, points.shape[0])
  return _inertia(_as_f32(points), _as_f32(centroids),
                  _weights_or_ones(weights, points.shape[0]), block_size)


def _select_rows(points: Array, idx: Array) -> Array:
  """points[idx] for idx [L] as a one-hot matmul (exact; no gather of a sharded point axis)."""
  onehot = (idx[:, None] == jnp.arange(points.shape[0])[None, :]).astype(jnp.float32)
  return jnp.dot(onehot, points, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _log_or_neg_inf(x: Array) -> Array:
  return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def kmeans_plus_plus_init(rng: Array, points: ArrayLike, num_clusters: int,
                          weights: Optional[ArrayLike] = None, *,
                          num_local_trials: Optional[int] = None) -> Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007), greedy like scikit-learn's.

  The first centroid is a point drawn with probability proportional to its weight; each next
  one is drawn with probability proportional to weight * D^2, D being the distance to the
  nearest centroid chosen so far (`jax.random.categorical` on log(weight * D^2)). With
  `num_local_trials` L > 1, L candidates are drawn and the one that lowers the potential
  sum(weight * D^2) most is kept. A `lax.fori_loop` over the K centroids carries the running
  minimum D^2 ([M]); memory is O(L * M) on top of the points.

  Jittable, with `points` (and `weights`) possibly sharded over devices along axis 0: every
  reduction is over the point axis and centroids are picked with a one-hot matmul, not a
  gather. Each draw uses one-dimensional Gumbel noise over the points, so appending
  zero-weight rows (padding) does not change which points are picked.

  Args:
    rng: PRNG key.
    points: [M, D] points (cast to float32).
    num_clusters: K.
    weights: optional [M] non-negative weights; zero-weight points are never picked. At least
      K points should have positive weight (not checked under jit).
    num_local_trials: candidates per centroid; default 2 + floor(ln K) as scikit-learn; 1 is
      plain k-means++.

  Returns:
    [K, D] float32 centroids, each a row of `points`. If fewer than K distinct weighted points
    exist, the remaining centroids repeat points.

  Raises:
    ValueError: if `points` is not [M, D] or M < K.
  """
  if points.ndim != 2:
    raise ValueError(f'points must be [num_points, dim], got shape {tuple(points.shape)}')
  m, d = points.shape
  _check_num_clusters(num_clusters, m)
  _check_weights(weights, m)
  k = int(num_clusters)
  trials = (2 + int(math.log(k))) if num_local_trials is None else int(num_local_trials)
  if trials < 1:
    raise ValueError(f'num_local_trials must be >= 1, got {num_local_trials}')
  points = _as_f32(points)
  weights = _weights_or_ones(weights, m)
  x_sq = jnp.sum(jnp.square(points), axis=-1)
  log_w = _log_or_neg_inf(weights)
  keys = jax.random.split(rng, k)

  def distances_to(cands):  # [L, D] -> [L, M]
    c_sq = jnp.sum(jnp.square(cands), axis=-1)
    return _squared_distances(points, x_sq, cands, c_sq).T

  first = _select_rows(points, jax.random.categorical(keys[0], log_w)[None])
  min_d2 = distances_to(first)[0]
  centroids = jnp.zeros((k, d), jnp.float32).at[0].set(first[0])

  def body(i, carry):
    centroids, min_d2 = carry
    potential = weights * min_d2
    # If every weighted point already coincides with a centroid, fall back to the weights.
    logits = jnp.where(jnp.any(potential > 0), _log_or_neg_inf(potential), log_w)
    trial_keys = jax.random.split(keys[i], trials)
    cand_idx = jax.vmap(lambda key: jax.random.categorical(key, logits))(trial_keys)
    cands = _select_rows(points, cand_idx)  # [L, D]
    new_min = jnp.minimum(min_d2[None, :], distances_to(cands))  # [L, M]
    best = jnp.argmin(jnp.sum(weights[None, :] * new_min, axis=-1)) if trials > 1 else 0
    return centroids.at[i].set(cands[best]), new_min[best]

  centroids, _ = lax.fori_loop(1, k, body, (centroids, min_d2))
  return centroids


def random_init(rng: Array, points: ArrayLike, num_clusters: int,
                weights: Optional[ArrayLike] = None) -> Array:
  """K distinct points drawn without replacement, with probabilities proportional to weight.

  Gumbel-top-k over the point axis; jittable and sharding-friendly like
  `kmeans_plus_plus_init`, and likewise insensitive to zero-weight padding rows.

  Args:
    rng: PRNG key.
    points: [M, D] points.
    num_clusters: K.
    weights: optional [M] non-negative weights; zero-weight points are never picked.

  Returns:
    [K, D] float32 centroids, rows of `points`.

  Raises:
    ValueError: if `points` is not [M, D] or M < K.
  """
  if points.ndim != 2:
    raise ValueError(f'points must be [num_points, dim], got shape {tuple(points.shape)}')
  _check_num_clusters(num_clusters, points.shape[0])
  _check_weights(weights, points.shape[0])
  points = _as_f32(points)
  weights = _weights_or_ones(weights, points.shape[0])
  scores = jax.random.gumbel(rng, (points.shape[0],)) + _log_or_neg_inf(weights)
  _, idx = lax.top_k(scores, int(num_clusters))
  return _select_rows(points, idx)


_INITS = {'kmeans++': kmeans_plus_plus_init, 'random': random_init}


# ----------------------------------------------------------------------------------------------
# Placement on a mesh and the jitted steps.


@dataclasses.dataclass(frozen=True)
class _Placement:
  """Where the points live: a mesh axis to split them over, or the default device."""
  mesh: Optional[Mesh]
  data_axis: AxisName
  block_size: Optional[int]

  @property
  def axis_size(self) -> int:
    if self.mesh is None:
      return 1
    axes = (self.data_axis,) if isinstance(self.data_axis, str) else tuple(self.data_axis)
    return math.prod(self.mesh.shape[a] for a in axes)

  def padded_rows(self, num_points: int) -> int:
    """Rows after padding: a multiple of the axis size, in equal blocks per shard."""
    n = self.axis_size
    return n * _padded_rows(-(-num_points // n), self.block_size)

  def sharding(self, spec: P) -> Optional[NamedSharding]:
    return None if self.mesh is None else NamedSharding(self.mesh, spec)

  @property
  def rows(self) -> Optional[NamedSharding]:
    return self.sharding(P(self.data_axis))

  @property
  def replicated(self) -> Optional[NamedSharding]:
    return self.sharding(P())

  def put_rows(self, x: np.ndarray) -> Array:
    """A host array on the mesh, split along axis 0 (padded beforehand)."""
    if self.mesh is None:
      return jax.device_put(x)
    sharding = self.rows
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def put_replicated(self, x: Any) -> Any:
    return x if self.mesh is None else jax.device_put(x, self.replicated)

  def jit(self, fn: Callable[..., Any], num_row_args: int, num_other_args: int,
          num_outputs: int) -> Callable[..., Any]:
    """jax.jit with the first `num_row_args` inputs split over the data axis, the rest and
    all outputs replicated."""
    if self.mesh is None:
      return jax.jit(fn)
    return jax.jit(fn,
                   in_shardings=(self.rows,) * num_row_args + (self.replicated,) * num_other_args,
                   out_shardings=(self.replicated,) * num_outputs if num_outputs > 1
                   else self.replicated)

  def stats(self, points: Array, weights: Array, centroids: Array) -> tuple[Array, Array, Array]:
    """Global (sums, counts, inertia): blocked per shard, then one psum over the data axis."""
    if self.mesh is None:
      return _local_stats(points, weights, centroids, self.block_size)

    def per_shard(x, w, c):
      return lax.psum(_local_stats(x, w, c, self.block_size), self.data_axis)

    return jax.shard_map(per_shard, mesh=self.mesh,
                         in_specs=(P(self.data_axis), P(self.data_axis), P()),
                         out_specs=(P(), P(), P()))(points, weights, centroids)


@functools.lru_cache(maxsize=32)
def _lloyd_fn(placement: _Placement) -> Callable[..., Any]:
  """Jitted (points, weights, centroids) -> (new centroids, inertia, counts)."""

  def step(points, weights, centroids):
    sums, counts, total = placement.stats(points, weights, centroids)
    return _update_centroids(sums, counts, centroids), total, counts

  return placement.jit(step, 2, 1, 3)


@functools.lru_cache(maxsize=32)
def _evaluate_fn(placement: _Placement) -> Callable[..., Any]:
  """Jitted (points, weights, centroids, counts, inertia) -> running (counts, inertia) sums."""

  def step(points, weights, centroids, counts, total):
    _, batch_counts, batch_total = placement.stats(points, weights, centroids)
    return counts + batch_counts, total + batch_total

  return placement.jit(step, 2, 3, 2)


@functools.lru_cache(maxsize=32)
def _minibatch_fn(placement: _Placement) -> Callable[..., Any]:
  """Jitted mini-batch update.

  (batch, weights, centroids, counts, epoch counts, epoch inertia) -> (centroids, counts,
  epoch counts, epoch inertia): the epoch sums accumulate the batch's counts and inertia
  (measured before the update) on the device.
  """

  def step(points, weights, centroids, counts, epoch_counts, epoch_total):
    sums, batch_counts, total = placement.stats(points, weights, centroids)
    new_counts = counts + batch_counts
    # Sculley's per-centre learning rate 1 / count, applied to the whole batch at once:
    # c <- c + (sum_x - n_b c) / (n + n_b), i.e. the mean of every point ever assigned to c.
    means = (centroids * counts[:, None] + sums) / jnp.maximum(
        new_counts, jnp.finfo(jnp.float32).tiny)[:, None]
    centroids = jnp.where(batch_counts[:, None] > 0, means, centroids)
    return centroids, new_counts, epoch_counts + batch_counts, epoch_total + total

  return placement.jit(step, 2, 4, 4)


@functools.lru_cache(maxsize=32)
def _init_fn(placement: _Placement, init: str, num_clusters: int,
             num_local_trials: Optional[int]) -> Callable[..., Any]:
  """Jitted (points, weights, rng) -> [K, D] initial centroids."""
  if init == 'kmeans++':
    fn = functools.partial(kmeans_plus_plus_init, num_clusters=num_clusters,
                           num_local_trials=num_local_trials)
  else:
    fn = functools.partial(random_init, num_clusters=num_clusters)
  return placement.jit(lambda points, weights, rng: fn(rng, points, weights=weights), 2, 1, 1)


def _make_placement(mesh: Optional[Mesh], data_axis: AxisName,
                    block_size: Optional[int]) -> _Placement:
  if block_size is not None and block_size < 1:
    raise ValueError(f'block_size must be positive, got {block_size}')
  if mesh is not None:
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
      raise ValueError(f'data_axis {data_axis!r}: mesh has axes {mesh.axis_names}')
    data_axis = axes[0] if len(axes) == 1 else axes
  return _Placement(mesh, data_axis, block_size)


def _host_points(points: ArrayLike, weights: Optional[ArrayLike],
                 name: str = 'points') -> tuple[np.ndarray, np.ndarray]:
  """Validated float32 host copies of points [M, D] and weights [M] (ones by default)."""
  points = np.asarray(points, np.float32)
  _check_points(points, name)
  if weights is None:
    return points, np.ones((points.shape[0],), np.float32)
  weights = np.asarray(weights, np.float32)
  _check_weights(weights, points.shape[0])
  return points, weights


def _place(placement: _Placement, points: np.ndarray,
           weights: np.ndarray) -> tuple[Array, Array]:
  """Pads with zero-weight rows and puts points and weights on the mesh, split along axis 0."""
  rows = placement.padded_rows(points.shape[0])
  pad = rows - points.shape[0]
  if pad:
    points = np.concatenate([points, np.zeros((pad, points.shape[1]), np.float32)])
    weights = np.concatenate([weights, np.zeros((pad,), np.float32)])
  return placement.put_rows(points), placement.put_rows(weights)


def _initial_centroids(placement: _Placement, points: np.ndarray, weights: np.ndarray,
                       num_clusters: int, rng: Array, init: str,
                       num_local_trials: Optional[int],
                       placed: Optional[tuple[Array, Array]] = None) -> Array:
  """Seeds on host points/weights (`placed`: the same already on the mesh, if they are)."""
  if init not in _INITS:
    raise ValueError(f'init must be one of {sorted(_INITS)}, got {init!r}')
  _check_num_clusters(num_clusters, int(np.count_nonzero(weights > 0)),
                      'points with positive weight')
  x, w = placed if placed is not None else _place(placement, points, weights)
  fn = _init_fn(placement, init, int(num_clusters), num_local_trials)
  return fn(x, w, placement.put_replicated(rng))


# ----------------------------------------------------------------------------------------------
# Fitting.


def fit_kmeans(points: ArrayLike, num_clusters: int, *, num_iters: int = 50, rng: Array,
               mesh: Optional[Mesh] = None, data_axis: AxisName = 'data', tol: float = 1e-4,
               init: str = 'kmeans++', weights: Optional[ArrayLike] = None,
               block_size: Optional[int] = DEFAULT_BLOCK_SIZE,
               num_local_trials: Optional[int] = None, log_every: int = 0) -> KMeansResult:
  """Lloyd's k-means on a device mesh, seeded with k-means++.

  `points` are copied to the mesh split along axis 0 over `data_axis` (padded with zero-weight
  rows to a multiple of that axis's size, and to equal distance blocks per device); centroids
  are replicated. One jitted step (explicit `NamedSharding` in/out shardings) computes, per
  device, blocked distances and per-cluster sums and counts and adds them across devices; the
  Python loop stops after `num_iters` steps or once the inertia improves by at most `tol`
  relative to the previous step's. With `mesh=None` everything runs on the default device.

  Args:
    points: [M, D] host array of points (cast to float32).
    num_clusters: K.
    num_iters: maximum Lloyd iterations.
    rng: PRNG key for the seeding.
    mesh: device mesh, e.g. `Partitioner().mesh`; None for the default device.
    data_axis: mesh axis (or tuple of axes) the points are split over.
    tol: iteration stops once an iteration improves the inertia by at most `tol` relative
      to the previous one (0: once it no longer improves, or after `num_iters`).
    init: 'kmeans++' (`kmeans_plus_plus_init`) or 'random' (`random_init`).
    weights: optional [M] non-negative point weights; zero-weight points are ignored.
    block_size: points per distance block per device (memory [block_size, K]); None for one
      block per device.
    num_local_trials: k-means++ candidates per centroid (see `kmeans_plus_plus_init`).
    log_every: log the inertia every this many iterations (0: never).

  Returns:
    KMeansResult: the final centroids, their inertia and cluster counts (one extra assignment
    pass), and the number of Lloyd iterations run.

  Raises:
    ValueError: fewer positive-weight points than clusters, non-finite points, bad shapes,
      an unknown `init` or a `data_axis` the mesh lacks.
  """
  points, weights = _host_points(points, weights)
  placement = _make_placement(mesh, data_axis, block_size)
  if init not in _INITS:
    raise ValueError(f'init must be one of {sorted(_INITS)}, got {init!r}')
  x, w = _place(placement, points, weights)
  centroids = _initial_centroids(placement, points, weights, num_clusters, rng, init,
                                 num_local_trials, placed=(x, w))
  step = _lloyd_fn(placement)
  prev = None
  iters = 0
  for it in range(num_iters):
    centroids, total, _ = step(x, w, centroids)
    iters = it + 1
    total = float(total)  # inertia of the centroids before this step
    if log_every and it % log_every == 0:
      logging.info('k-means iteration %d: inertia %.6g', it, total)
    if prev is not None and prev - total <= tol * abs(prev):
      break
    prev = total
  _, total, counts = step(x, w, centroids)
  return KMeansResult(centroids=np.asarray(centroids), inertia=float(total),
                      num_iters_run=iters, counts=np.asarray(counts))


def _rng_to_numpy(rng: Array) -> np.random.Generator:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.random.default_rng(np.asarray(rng).astype(np.uint32).ravel().tolist())


def _chunks(points: np.ndarray, size: int) -> Iterator[np.ndarray]:
  for start in range(0, points.shape[0], size):
    yield points[start:start + size]


def fit_kmeans_minibatch(batches: Union[ArrayLike, Iterable[ArrayLike],
                                        Callable[[], Iterable[ArrayLike]]],
                         num_clusters: int, *, rng: Array, batch_size: int = 1024,
                         num_epochs: int = 10, weights: Optional[ArrayLike] = None,
                         init: str = 'kmeans++', init_size: Optional[int] = None,
                         tol: float = 0.0, mesh: Optional[Mesh] = None,
                         data_axis: AxisName = 'data',
                         block_size: Optional[int] = DEFAULT_BLOCK_SIZE,
                         num_local_trials: Optional[int] = None,
                         log_every: int = 0) -> KMeansResult:
  """Mini-batch k-means (Sculley 2010, "Web-scale k-means clustering").

  Each centroid c keeps a count n_c of the (weighted) points ever assigned to it. A batch is
  assigned with the current centroids, then every centroid that got points moves by Sculley's
  per-centre learning rate 1 / n_c: c <- c + (sum_x - b_c c) / (n_c + b_c), b_c being its
  batch count, so c is the running mean of all points assigned to it. Centroids are seeded by
  `init` on the first `init_size` points. Batches are padded with zero-weight rows to a fixed
  size (so one compiled step serves them all) and split over `data_axis` like `fit_kmeans`.

  Args:
    batches: an [M, D] array (each epoch visits a fresh random permutation in batches of
      `batch_size`), an iterable of [B, D] arrays (rows beyond `batch_size` are split into
      further batches), or a zero-argument callable returning such an iterable. An iterator
      (consumed once) only allows `num_epochs=1`.
    num_clusters: K.
    rng: PRNG key for the seeding and the shuffling of an array.
    batch_size: rows per update.
    num_epochs: passes over the data.
    weights: optional [M] non-negative point weights when `batches` is an array.
    init: 'kmeans++' or 'random'.
    init_size: points to seed on (default max(3 K, batch_size)): a random subset of an array,
      or the first batches of an iterable.
    tol: stop after an epoch whose mean batch inertia improved by less than this, relative to
      the previous epoch's (0: run all epochs).
    mesh: device mesh; None for the default device.
    data_axis: mesh axis (or axes) batches are split over.
    block_size: points per distance block per device.
    num_local_trials: k-means++ candidates per centroid.
    log_every: log the mean batch inertia every this many updates (0: never).

  Returns:
    KMeansResult with `num_iters_run` the number of batch updates. For an array input,
    `inertia` and `counts` are exact (a final assignment pass over all points); for an
    iterable they are summed over the last epoch's batches, each measured with the centroids
    in force when it was seen (call `inertia` for the exact value).

  Raises:
    ValueError: fewer (positive-weight) seeding points than clusters, non-finite points,
      inconsistent dimensions, `weights` with an iterable, or an iterator with num_epochs > 1.
  """
  if batch_size < 1 or num_epochs < 1:
    raise ValueError(f'batch_size and num_epochs must be positive, got {batch_size}, '
                     f'{num_epochs}')
  placement = _make_placement(mesh, data_axis, block_size)
  init_rng, shuffle_rng = jax.random.split(rng)
  np_rng = _rng_to_numpy(shuffle_rng)
  init_size = max(3 * int(num_clusters), batch_size) if init_size is None else int(init_size)
  is_array = isinstance(batches, (np.ndarray, jax.Array))

  if is_array:
    all_points, all_weights = _host_points(batches, weights)
    init_idx = np_rng.permutation(all_points.shape[0])[:init_size]
    seed_points, seed_weights = all_points[init_idx], all_weights[init_idx]

    def epoch_batches(_):
      order = np_rng.permutation(all_points.shape[0])
      for start in range(0, order.shape[0], batch_size):
        idx = order[start:start + batch_size]
        yield all_points[idx], all_weights[idx]
  else:
    if weights is not None:
      raise ValueError('weights are only supported with an array of points')
    make_iter = batches if callable(batches) else (lambda: batches)
    if not callable(batches) and iter(batches) is batches and num_epochs > 1:
      raise ValueError('batches is an iterator, which can be consumed once: pass a list, an '
                       'array or a callable returning an iterable for num_epochs > 1')
    dim = None
    buffered: list[np.ndarray] = []

    def checked(it: Iterable[ArrayLike]) -> Iterator[np.ndarray]:
      nonlocal dim
      for i, item in enumerate(it):
        item = np.asarray(item, np.float32)
        _check_points(item, f'batch {i}')
        if dim is None:
          dim = item.shape[1]
        elif item.shape[1] != dim:
          raise ValueError(f'dimension mismatch: batch {i} has D={item.shape[1]}, earlier '
                           f'batches D={dim}')
        yield from _chunks(item, batch_size)

    first_iter = checked(make_iter())
    seen = 0
    for chunk in first_iter:
      buffered.append(chunk)
      seen += chunk.shape[0]
      if seen >= init_size:
        break
    if not buffered:
      raise ValueError('batches is empty')
    seed_points = np.concatenate(buffered)[:init_size]
    seed_weights = np.ones((seed_points.shape[0],), np.float32)

    def epoch_batches(epoch):
      if epoch == 0:
        for chunk in buffered:
          yield chunk, np.ones((chunk.shape[0],), np.float32)
        for chunk in first_iter:
          yield chunk, np.ones((chunk.shape[0],), np.float32)
      else:
        for chunk in checked(make_iter()):
          yield chunk, np.ones((chunk.shape[0],), np.float32)

  centroids = _initial_centroids(placement, seed_points, seed_weights, num_clusters, init_rng,
                                 init, num_local_trials)
  k = int(num_clusters)
  counts = placement.put_replicated(jnp.zeros((k,), jnp.float32))
  step = _minibatch_fn(placement)
  rows = placement.padded_rows(batch_size)

  def put(x, w):  # pads a batch to `rows` zero-weight rows and splits it over the data axis
    if x.shape[1] != centroids.shape[1]:
      raise ValueError(f'dimension mismatch: batch has D={x.shape[1]}, centroids '
                       f'D={centroids.shape[1]}')
    pad = rows - x.shape[0]
    if pad:
      x = np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)])
      w = np.concatenate([w, np.zeros((pad,), np.float32)])
    return placement.put_rows(x), placement.put_rows(w)

  def zeros():
    return (placement.put_replicated(jnp.zeros((k,), jnp.float32)),
            placement.put_replicated(jnp.zeros((), jnp.float32)))

  updates = 0
  prev = None
  epoch_counts, epoch_total = zeros()
  for epoch in range(num_epochs):
    epoch_counts, epoch_total = zeros()
    epoch_weight = 0.0
    for x, w in epoch_batches(epoch):
      epoch_weight += float(w.sum())
      centroids, counts, epoch_counts, epoch_total = step(*put(x, w), centroids, counts,
                                                          epoch_counts, epoch_total)
      updates += 1
      if log_every and updates % log_every == 0:
        logging.info('mini-batch k-means update %d: epoch %d mean batch inertia %.6g',
                     updates, epoch, float(epoch_total) / max(epoch_weight, 1e-30))
    mean = float(epoch_total) / max(epoch_weight, 1e-30)
    if tol > 0 and prev is not None and prev - mean < tol * abs(prev):
      break
    prev = mean

  if is_array:  # exact, one batch at a time (the points need not fit on the devices)
    evaluate = _evaluate_fn(placement)
    epoch_counts, epoch_total = zeros()
    for start in range(0, all_points.shape[0], batch_size):
      epoch_counts, epoch_total = evaluate(
          *put(all_points[start:start + batch_size], all_weights[start:start + batch_size]),
          centroids, epoch_counts, epoch_total)
  return KMeansResult(centroids=np.asarray(centroids), inertia=float(epoch_total),
                      num_iters_run=updates, counts=np.asarray(epoch_counts))
