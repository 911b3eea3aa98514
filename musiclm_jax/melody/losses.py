"""Triplet losses of the melody embedder: FaceNet semi-hard and batch-all, over the global batch.

Embeddings carry integer melody labels; two rows with the same label are a positive pair (two
renderings of one melody, or two crops of one), rows with different labels are negatives. Label 0
marks padding rows (a partial eval batch is padded with zeros): they are neither anchors,
positives nor negatives. Distances are squared Euclidean between L2-normalised embeddings,
d = 2 - 2 cos, in [0, 4] (FaceNet's).

Semi-hard (`semi_hard_triplet_loss`, FaceNet, Schroff et al., 2015, as in TF-Addons'
`triplet_semihard_loss`): for every anchor a and positive p, the negative is the hardest one that
is still farther from the anchor than the positive, n* = argmin {d(a, n) : d(a, n) > d(a, p)}
(the semi-hard ones, d(a,p) < d(a,n) < d(a,p) + margin, are the only ones that can give a loss,
and this is the hardest of them); when no negative is farther than the positive, the easiest
negative (the farthest one) is used instead, so a collapsed batch still gets a gradient that
pushes the closest confusions apart slowly rather than a hard-negative gradient that collapses
the embedding. The loss is the mean over all (a, p) pairs of max(0, d(a, p) - d(a, n*) + margin).

Batch-all (`batch_all_triplet_loss`, Hermans et al., 2017): the mean of max(0, d(a,p) - d(a,n) +
margin) over all triplets with a positive loss. It builds a [N, N, N] tensor: fine for a few
hundred rows, not for thousands.

Global batch. The losses take the embeddings of the whole global batch: under `jax.jit` with the
batch sharded over devices (the trainer's 'batch' axis), XLA gathers the [N, D] embeddings for
the [N, N] distance matrix, so negatives come from every device, exactly as on one device.

Mining without [N, N, N]: per anchor, the negatives' distances are sorted once; the semi-hard
negative of each positive is found by `searchsorted`: O(N^2 log N) time and O(N^2) memory.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from musiclm_jax.mulan.losses import l2_normalize

Array = jax.Array

DEFAULT_MARGIN = 0.2


def pairwise_squared_distances(emb: Array) -> Array:
  """||x_i - x_j||^2 of the L2-normalised rows: [N, N] float32, >= 0, zero diagonal."""
  x = l2_normalize(emb)
  cos = jnp.einsum('id,jd->ij', x, x, precision=jax.lax.Precision.HIGHEST)
  d = jnp.maximum(2.0 - 2.0 * cos, 0.0)
  return d * (1.0 - jnp.eye(x.shape[0], dtype=d.dtype))


def _masks(labels: Array, valid: Optional[Array]) -> tuple[Array, Array, Array]:
  """(positive [N, N], negative [N, N], valid [N]) boolean masks of integer labels."""
  labels = jnp.asarray(labels).reshape(-1)
  n = labels.shape[0]
  keep = labels != 0
  if valid is not None:
    keep = keep & jnp.asarray(valid).astype(jnp.bool_).reshape(n)
  both = keep[:, None] & keep[None, :]
  same = labels[:, None] == labels[None, :]
  positive = same & both & ~jnp.eye(n, dtype=jnp.bool_)
  negative = ~same & both
  return positive, negative, keep


def semi_hard_negatives(dist: Array, negative: Array) -> tuple[Array, Array]:
  """The semi-hard negative distance of every (anchor, positive) entry of `dist`.

  Args:
    dist: [N, N] distances.
    negative: [N, N] bool, (a, n) pairs.

  Returns:
    (d_an [N, N]: for entry (a, p) the smallest d(a, n) > d(a, p), or, when there is none, the
    largest d(a, n); found [N, N] bool: whether a negative farther than the positive existed).
    Entries of anchors without negatives are 0 (and not found).
  """
  # Every entry (a, j) is computed as if j were a positive of a; the caller masks.
  n = dist.shape[0]
  big = jnp.asarray(jnp.finfo(jnp.float32).max, dist.dtype)
  neg_sorted = jnp.sort(jnp.where(negative, dist, big), axis=1)  # negatives first, ascending
  num_neg = jnp.sum(negative, axis=1)
  # First index whose distance exceeds d(a, p): the semi-hard negative, if inside the negatives.
  first = jax.vmap(lambda row, q: jnp.searchsorted(row, q, side='right'))(neg_sorted, dist)
  found = first < num_neg[:, None]
  outside = jnp.take_along_axis(neg_sorted, jnp.minimum(first, n - 1), axis=1)
  easiest = jnp.take_along_axis(neg_sorted, jnp.maximum(num_neg - 1, 0)[:, None], axis=1)
  d_an = jnp.where(found, outside, easiest)
  return jnp.where(num_neg[:, None] > 0, d_an, 0.0), found


def semi_hard_triplet_loss(emb: Array, labels: Array, margin: float = DEFAULT_MARGIN,
                           valid: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """FaceNet semi-hard triplet loss over the batch (see the module docstring).

  Args:
    emb: [N, D] embeddings (normalised here).
    labels: [N] integer melody labels; 0 marks padding.
    margin: the triplet margin (on squared distances in [0, 4]).
    valid: optional [N] bool, false for rows to ignore (besides label 0).

  Returns:
    (loss, stats): the mean hinge over (anchor, positive) pairs (0 without pairs); stats are
    float32 scalars: 'num_pairs', 'active_fraction' (pairs with a positive hinge),
    'semi_hard_fraction' (pairs that found a negative farther than the positive),
    'positive_distance' and 'negative_distance' (means over pairs of d(a,p) and the mined d(a,n)).
  """
  dist = pairwise_squared_distances(emb)
  positive, negative, _ = _masks(labels, valid)
  has_negative = jnp.any(negative, axis=1)
  pairs = positive & has_negative[:, None]
  d_an, found = semi_hard_negatives(dist, negative)
  hinge = jnp.maximum(dist - d_an + margin, 0.0)
  w = pairs.astype(jnp.float32)
  count = jnp.sum(w)
  n = jnp.maximum(count, 1.0)
  loss = jnp.sum(hinge * w) / n
  stats = {'num_pairs': count,
           'active_fraction': jnp.sum((hinge > 0) * w) / n,
           'semi_hard_fraction': jnp.sum(found * w) / n,
           'positive_distance': jnp.sum(dist * w) / n,
           'negative_distance': jnp.sum(d_an * w) / n}
  return loss, stats


def batch_all_triplet_loss(emb: Array, labels: Array, margin: float = DEFAULT_MARGIN,
                           valid: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """Mean hinge over all triplets whose hinge is positive (Hermans et al.'s batch-all).

  Args and returns as `semi_hard_triplet_loss`; 'active_fraction' is over all valid triplets
  and the distances are the means over valid triplets.
  """
  dist = pairwise_squared_distances(emb)
  positive, negative, _ = _masks(labels, valid)
  triplet = positive[:, :, None] & negative[:, None, :]          # [a, p, n]
  hinge = jnp.maximum(dist[:, :, None] - dist[:, None, :] + margin, 0.0)
  w = triplet.astype(jnp.float32)
  active = (hinge > 1e-12) & triplet
  num_active = jnp.sum(active)
  loss = jnp.sum(hinge * w) / jnp.maximum(num_active, 1)
  total = jnp.maximum(jnp.sum(w), 1.0)
  pair_w = positive.astype(jnp.float32)
  stats = {'num_pairs': jnp.sum(pair_w),
           'active_fraction': num_active / total,
           'semi_hard_fraction': jnp.sum(((dist[:, None, :] > dist[:, :, None]) & triplet)) / total,
           'positive_distance': jnp.sum(dist * pair_w) / jnp.maximum(jnp.sum(pair_w), 1.0),
           'negative_distance': jnp.sum(dist[:, None, :] * w) / total}
  return loss, stats


TRIPLET_LOSSES = {'semi_hard': semi_hard_triplet_loss, 'batch_all': batch_all_triplet_loss}


def nearest_neighbour_hits(emb: Array, labels: Array, valid: Optional[Array] = None
                           ) -> tuple[Array, Array]:
  """In-batch top-1 retrieval: is each row's nearest other row (by cosine) of its label?

  Only rows that have a positive in the batch are queries; ties go to the lower index.

  Returns:
    (hits [N] float32, queries [N] float32), zeros at rows that are not queries.
  """
  dist = pairwise_squared_distances(emb)
  positive, _, keep = _masks(labels, valid)
  n = dist.shape[0]
  candidates = keep[None, :] & ~jnp.eye(n, dtype=jnp.bool_)
  best = jnp.argmin(jnp.where(candidates, dist, jnp.inf), axis=1)
  hit = jnp.take_along_axis(positive, best[:, None], axis=1)[:, 0]
  query = (keep & jnp.any(positive, axis=1)).astype(jnp.float32)
  return hit.astype(jnp.float32) * query, query
