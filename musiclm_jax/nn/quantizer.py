"""Residual vector quantizer with EMA codebooks, k-means init and code restarts."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Non-trainable collection holding codebooks and their EMA statistics; it is
# updated by `__call__(train=True)` with `mutable=['quantizer_state']`, never
# by the optimizer.
STATE_COLLECTION = 'quantizer_state'
# Rng stream used in training for k-means seeding, dead-code restarts and
# quantizer dropout.
RNG_STREAM = 'quantizer'
# Code id reported for levels that were not used for a position.
UNUSED_CODE = -1


def _squared_distances(x: Array, codebook: Array) -> Array:
  """[M, D] x [K, D] -> [M, K] squared Euclidean distances (float32)."""
  x_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  c_sq = jnp.sum(jnp.square(codebook), axis=-1)[None, :]
  cross = jnp.dot(x, codebook.T, precision=lax.Precision.HIGHEST)
  return x_sq - 2.0 * cross + c_sq


def _sample_rows(rng: Array, x: Array, weights: Array, num: int,
                 replace: bool) -> Array:
  """Samples `num` rows of x [M, D], only from rows with positive weight.

  Uses the Gumbel-top-k trick when sampling without replacement, so the
  result is a uniform random subset of the weighted rows (rows with zero
  weight are only picked when fewer than `num` rows have positive weight).
  """
  m = x.shape[0]
  logits = jnp.where(weights > 0, 0.0, -1e9)
  if replace or num > m:
    idx = jax.random.categorical(rng, logits, shape=(num,))
  else:
    gumbel = jax.random.gumbel(rng, (m,))
    _, idx = lax.top_k(logits + gumbel, num)
  return x[idx]


def kmeans(rng: Array, x: Array, weights: Array, num_clusters: int,
           num_iters: int) -> Array:
  """Weighted Lloyd k-means seeded with a random subset of the data.

  Args:
    rng: PRNG key for the seeding.
    x: [M, D] float32 points.
    weights: [M] non-negative point weights (0 excludes a point).
    num_clusters: K.
    num_iters: number of Lloyd iterations.

  Returns:
    [K, D] centroids; a cluster that ends up empty keeps its previous
    centroid (the dead-code restart revives it later if it stays unused).
  """
  centroids = _sample_rows(rng, x, weights, num_clusters, replace=False)

  def step(_, centroids):
    assign = jnp.argmin(_squared_distances(x, centroids), axis=-1)
    onehot = jax.nn.one_hot(assign, num_clusters, dtype=jnp.float32)
    onehot = onehot * weights[:, None]
    counts = jnp.sum(onehot, axis=0)
    sums = jnp.dot(onehot.T, x, precision=lax.Precision.HIGHEST)
    new = sums / jnp.maximum(counts, 1e-12)[:, None]
    return jnp.where(counts[:, None] > 0, new, centroids)

  return lax.fori_loop(0, num_iters, step, centroids)


class ResidualVectorQuantizer(nn.Module):
  """Residual VQ (SoundStream / EnCodec style) with EMA codebook learning.

  Level l quantizes the residual left by levels 0..l-1; the output is the sum
  of the selected codewords. Codebooks are not trained by gradients: they
  follow exponential moving averages of the vectors assigned to them, and
  live with their statistics in the non-trainable 'quantizer_state'
  collection:

    codebook        [levels, K, D]  ('codebook_levels', 'codebook', 'embed')
    ema_cluster_size [levels, K]    ('codebook_levels', 'codebook')
    ema_embed_sum   [levels, K, D]  ('codebook_levels', 'codebook', 'embed')
    initialized     [levels] bool   ('codebook_levels',) true once a
                                    training batch reached that level

  Training calls (`train=True`) must pass `mutable=['quantizer_state']` and a
  'quantizer' rng. On the first training call that reaches a level
  (`initialized[level]` false) its codebook is set by k-means on that level's
  residuals (when `kmeans_init`), and its EMA statistics are set to that
  batch's statistics (decay 0) so there is no zero-initialisation bias. Cluster sizes are
  measured in assigned vectors per training batch.

  Attributes:
    num_levels: number of residual levels N.
    codebook_size: codes per level K.
    dim: vector dimension D.
    commitment_cost: weight of the commitment loss.
    ema_decay: EMA decay of cluster sizes and sums.
    epsilon: minimum EMA cluster size for a codeword to be recomputed from its
      EMA sum (avoids dividing by ~0 for codes that are never used).
    kmeans_init: initialise codebooks with k-means on the first training
      batch.
    kmeans_iters: Lloyd iterations of that k-means.
    dead_code_threshold: a code whose EMA cluster size falls below this is
      replaced by a random residual vector of the current batch (its size is
      reset to the threshold, so it survives only if it attracts at least
      that many vectors per batch). 0 disables restarts.
    quantizer_dropout: in training, sample per example a number of levels
      n_q uniformly in [1, N] (N = `n_levels` when given) and use only the
      first n_q levels for that example.
    quantizer_dropout_prob: with quantizer dropout, the fraction of examples
      that draw n_q; the others use all N levels (DAC: 0.5), so the decoder
      learns what every level adds instead of seeing N levels 1/N of the time.
    dtype: dtype of the returned `quantized` (distances and EMA statistics
      are always float32).
    param_dtype: dtype of the state arrays.
    codebook_init: initializer of the codebook before any training call.
  """
  num_levels: int
  codebook_size: int
  dim: int
  commitment_cost: float = 0.25
  ema_decay: float = 0.99
  epsilon: float = 1e-5
  kmeans_init: bool = True
  kmeans_iters: int = 10
  dead_code_threshold: float = 2.0
  quantizer_dropout: bool = False
  quantizer_dropout_prob: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  codebook_init: Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    n, k, d = self.num_levels, self.codebook_size, self.dim
    codebook_axes = ('codebook_levels', 'codebook', 'embed')

    def state(name, axes, init_fn, shape, dtype):
      # The initialiser only runs when the variable does not exist yet, so
      # the 'params' rng is needed by `init` only.
      boxed = nn.with_logical_partitioning(init_fn, axes)
      return self.variable(STATE_COLLECTION, name,
                           lambda: boxed(self.make_rng('params'), shape,
                                         dtype))

    self.codebook = state('codebook', codebook_axes, self.codebook_init,
                          (n, k, d), self.param_dtype)
    self.ema_cluster_size = state('ema_cluster_size',
                                  ('codebook_levels', 'codebook'),
                                  nn.initializers.zeros, (n, k),
                                  self.param_dtype)
    self.ema_embed_sum = state('ema_embed_sum', codebook_axes,
                               nn.initializers.zeros, (n, k, d),
                               self.param_dtype)
    self.initialized = state('initialized', ('codebook_levels',),
                             nn.initializers.zeros, (n,), jnp.bool_)

  def _levels(self, n_levels: Optional[int]) -> int:
    if n_levels is None:
      return self.num_levels
    if not 1 <= n_levels <= self.num_levels:
      raise ValueError(
          f'n_levels must be in [1, {self.num_levels}], got {n_levels}')
    return n_levels

  def __call__(self, x: Array, *, train: bool,
               n_levels: Optional[int] = None) -> Dict[str, Array]:
    """Quantizes `x`, updating the codebooks when training.

    Args:
      x: [batch, length, D] vectors.
      train: update the 'quantizer_state' collection (k-means init, EMA,
        dead-code restarts) and apply quantizer dropout; requires
        `mutable=['quantizer_state']` and a 'quantizer' rng.
      n_levels: optional static number of levels to use (defaults to all N).

    Returns:
      A dict with
        quantized: [batch, length, D] in `dtype`, straight-through estimator
          `x + stop_gradient(q - x)` (value q, gradient identity).
        codes: [batch, length, N] int32 code ids; levels not used for a
          position (beyond `n_levels` or dropped by quantizer dropout) are -1.
        commitment_loss: scalar, commitment_cost * mean((x - sg(q))**2) over
          all elements (gradient only reaches x).
        usage: [N] fraction of the K codes of each level selected at least
          once in this batch (0 for unused levels).
        perplexity: [N] exp(entropy) of each level's code histogram (0 for
          levels that quantized no vector).
        num_active_levels: [batch] number of levels used per example.
    """
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f'expected [batch, length, {self.dim}], got {x.shape}')
    levels = self._levels(n_levels)
    batch, length, _ = x.shape
    n, k = self.num_levels, self.codebook_size
    x32 = x.astype(jnp.float32)
    # Code search, k-means and EMA statistics are not differentiated; the
    # gradient reaches x only through the straight-through output and the
    # commitment loss.
    flat = lax.stop_gradient(jnp.reshape(x32, (batch * length, self.dim)))

    if train:
      rng = self.make_rng(RNG_STREAM)
      dropout_rng, rng = jax.random.split(rng)
      level_rngs = jax.random.split(rng, levels)
      was_initialized = self.initialized.value
      if self.quantizer_dropout:
        n_active = jax.random.randint(dropout_rng, (batch,), 1, levels + 1)
        if self.quantizer_dropout_prob < 1.0:
          drawn = jax.random.bernoulli(jax.random.fold_in(dropout_rng, 1),
                                       self.quantizer_dropout_prob, (batch,))
          n_active = jnp.where(drawn, n_active, levels)
        if self.kmeans_init:
          # The k-means batch must reach every level to initialise them all.
          n_active = jnp.where(jnp.all(was_initialized[:levels]), n_active,
                               levels)
      else:
        n_active = jnp.full((batch,), levels, jnp.int32)
      codebook_all = self.codebook.value.astype(jnp.float32)
      cluster_all = self.ema_cluster_size.value.astype(jnp.float32)
      sum_all = self.ema_embed_sum.value.astype(jnp.float32)
    else:
      n_active = jnp.full((batch,), levels, jnp.int32)
      codebook_all = self.codebook.value.astype(jnp.float32)

    # [M] per-position count of active levels.
    n_active_flat = jnp.repeat(n_active, length)
    residual = flat
    quantized = jnp.zeros_like(flat)
    codes_per_level = []
    usage = []
    perplexity = []
    new_codebooks, new_clusters, new_sums, reached = [], [], [], []
    for level in range(levels):
      active = (n_active_flat > level).astype(jnp.float32)  # [M]
      codebook = codebook_all[level]
      if train and self.kmeans_init:
        codebook = lax.cond(
            was_initialized[level],
            lambda cb, *_: cb,
            lambda cb, key, r, w: kmeans(key, r, w, k, self.kmeans_iters),
            codebook, jax.random.fold_in(level_rngs[level], 0), residual,
            active)
      codes = jnp.argmin(_squared_distances(residual, codebook), axis=-1)
      onehot = jax.nn.one_hot(codes, k, dtype=jnp.float32) * active[:, None]
      counts = jnp.sum(onehot, axis=0)  # [K]
      total = jnp.sum(counts)
      probs = counts / jnp.maximum(total, 1.0)
      entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(
          jnp.where(probs > 0, probs, 1.0)), 0.0))
      usage.append(jnp.mean((counts > 0).astype(jnp.float32)))
      perplexity.append(jnp.where(total > 0, jnp.exp(entropy), 0.0))

      level_q = codebook[codes] * active[:, None]
      codes_per_level.append(
          jnp.where(active > 0, codes.astype(jnp.int32), UNUSED_CODE))

      if train:
        sums = jnp.dot(onehot.T, residual, precision=lax.Precision.HIGHEST)
        # A level's first training batch overwrites its (zero) statistics.
        decay = jnp.where(was_initialized[level], self.ema_decay, 0.0)
        cluster = decay * cluster_all[level] + (1.0 - decay) * counts
        embed_sum = decay * sum_all[level] + (1.0 - decay) * sums
        # EMA sum / EMA size is the (debiased) running mean of assigned
        # vectors; codes too rarely used keep their codeword.
        updated = jnp.where(
            cluster[:, None] > self.epsilon,
            embed_sum / jnp.maximum(cluster, self.epsilon)[:, None], codebook)
        if self.dead_code_threshold > 0:
          dead = cluster < self.dead_code_threshold
          replacement = _sample_rows(
              jax.random.fold_in(level_rngs[level], 1), residual, active, k,
              replace=True)
          updated = jnp.where(dead[:, None], replacement, updated)
          cluster = jnp.where(dead, self.dead_code_threshold, cluster)
          embed_sum = jnp.where(dead[:, None],
                                replacement * self.dead_code_threshold,
                                embed_sum)
        new_codebooks.append(updated)
        reached.append(total > 0)
        new_clusters.append(cluster)
        new_sums.append(embed_sum)

      quantized = quantized + level_q
      residual = residual - level_q

    if train:
      # Levels beyond `levels` were not touched and keep their state.
      def merge(old, new):
        stacked = jnp.stack(new)
        return old.at[:levels].set(stacked).astype(self.param_dtype)

      self.codebook.value = merge(codebook_all, new_codebooks)
      self.ema_cluster_size.value = merge(cluster_all, new_clusters)
      self.ema_embed_sum.value = merge(sum_all, new_sums)
      # With quantizer dropout (and no k-means) a level may see no vector in
      # a batch; it then stays uninitialised until one reaches it.
      self.initialized.value = was_initialized.at[:levels].set(
          jnp.logical_or(was_initialized[:levels], jnp.stack(reached)))

    unused = [jnp.full((batch * length,), UNUSED_CODE, jnp.int32)] * (
        n - levels)
    codes = jnp.stack(codes_per_level + unused, axis=-1)
    codes = jnp.reshape(codes, (batch, length, n))
    zeros = [jnp.zeros((), jnp.float32)] * (n - levels)
    q = jnp.reshape(quantized, x32.shape)
    commitment_loss = self.commitment_cost * jnp.mean(
        jnp.square(x32 - lax.stop_gradient(q)))
    straight_through = x32 + lax.stop_gradient(q - x32)
    return dict(
        quantized=straight_through.astype(self.dtype),
        codes=codes,
        commitment_loss=commitment_loss,
        usage=jnp.stack(usage + zeros),
        perplexity=jnp.stack(perplexity + zeros),
        num_active_levels=n_active)

  def encode(self, x: Array, n_levels: Optional[int] = None) -> Array:
    """Returns [..., N] int32 codes of x [..., D] (unused levels are -1).

    Args:
      x: [..., D] vectors.
      n_levels: optional static number of levels (defaults to N).
    """
    levels = self._levels(n_levels)
    lead = x.shape[:-1]
    residual = jnp.reshape(x.astype(jnp.float32), (-1, self.dim))
    codebooks = self.codebook.value.astype(jnp.float32)
    codes = []
    for level in range(levels):
      c = jnp.argmin(_squared_distances(residual, codebooks[level]), axis=-1)
      residual = residual - codebooks[level][c]
      codes.append(c.astype(jnp.int32))
    codes += [jnp.full(residual.shape[:1], UNUSED_CODE, jnp.int32)] * (
        self.num_levels - levels)
    return jnp.reshape(jnp.stack(codes, axis=-1), lead + (self.num_levels,))

  def decode(self, codes: Array) -> Array:
    """Maps codes [..., n] (n <= N, -1 = unused) to vectors [..., D].

    The result is the sum over levels of the selected codewords; negative
    codes contribute nothing.
    """
    codebooks = self.codebook.value.astype(jnp.float32)
    n = codes.shape[-1]
    if n > self.num_levels:
      raise ValueError(f'codes have {n} levels, quantizer has '
                       f'{self.num_levels}')
    out = jnp.zeros(codes.shape[:-1] + (self.dim,), jnp.float32)
    for level in range(n):
      c = codes[..., level]
      vec = codebooks[level][jnp.maximum(c, 0)]
      out = out + jnp.where((c >= 0)[..., None], vec, 0.0)
    return out.astype(self.dtype)
