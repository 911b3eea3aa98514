"""MuLan's contrastive losses, retrieval metrics and long-audio windowing.

Global negatives. The losses are written on global arrays: every clip in the batch is a negative
for every caption and back. Called under `jax.jit` with the batch sharded over the mesh (the
partitioner's `batch` rule), XLA gathers the other shards' embeddings for the [batch, batch]
similarity matrix by itself, so the loss on an 8-device mesh is exactly the one-device loss on
the whole global batch (tests/mulan/test_losses.py checks it). Do not compute these losses per
device (inside `shard_map` or `pmap` without an all-gather): a per-shard loss sees batch / 8
negatives, which is the usual reason a contrastive loss never moves at small per-device batch.

Duplicate captions. A batch may hold the same text twice (MusicCaps aspect lists, short captions
such as 'piano'). With `text_ids`, equal ids (or equal token rows) mark the same text:
  - softmax loss: each row's target stays its own pair, and the other pairs with the same text
    are removed from its softmax in both directions (they are not negatives, and asking the
    model to rank one of two identical captions above the other would be noise);
  - sigmoid loss: every pair with the same text is labelled positive (the sigmoid loss has no
    single target per row, so a duplicate is simply another positive);
  - recall: the duplicates of a query's own target are removed from its ranking.
Without `text_ids` every row is a distinct text (CLIP's assumption).

Padding rows. `valid` ([batch] bool) drops rows that pad a final partial eval batch: they are
neither queries nor keys, and means are over valid rows only.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_NEG = float(jnp.finfo(jnp.float32).min)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) over the last axis, in float32."""
  x = jnp.asarray(x).astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True),
                                       eps * eps))


def same_text_matrix(text_ids: Optional[Array], batch: int) -> Array:
  """[batch, batch] bool: entry (i, j) is true when rows i and j hold the same text.

  Args:
    text_ids: None (all texts distinct: the identity), [batch] ids (e.g. caption hashes), or
      [batch, length] token ids (rows equal on every position, padding included, are the same
      text).
    batch: the batch size.
  """
  if text_ids is None:
    return jnp.eye(batch, dtype=jnp.bool_)
  ids = jnp.asarray(text_ids)
  if ids.shape[0] != batch:
    raise ValueError(f'text_ids has {ids.shape[0]} rows, the embeddings {batch}')
  if ids.ndim == 1:
    return ids[:, None] == ids[None, :]
  ids = ids.reshape(batch, -1)
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


def _valid(valid: Optional[Array], batch: int) -> Array:
  if valid is None:
    return jnp.ones((batch,), jnp.bool_)
  return jnp.asarray(valid).astype(jnp.bool_).reshape(batch)


def similarity_logits(audio_emb: Array, text_emb: Array, log_temperature: Array) -> Array:
  """exp(log_temperature) * cos(audio_i, text_j): [batch, batch] float32, rows are audio."""
  a = l2_normalize(audio_emb)
  t = l2_normalize(text_emb)
  scale = jnp.exp(jnp.asarray(log_temperature, jnp.float32))
  return scale * jnp.einsum('id,jd->ij', a, t, precision=jax.lax.Precision.HIGHEST)


def _argmax_hits(logits: Array, positive: Array, keys: Array) -> Array:
  """Per row: is the best-scoring key (first on ties) a positive? Masked keys never win."""
  best = jnp.argmax(jnp.where(keys[None, :], logits, _NEG), axis=-1)
  return jnp.take_along_axis(positive, best[:, None], axis=-1)[:, 0]


def softmax_contrastive_terms(audio_emb: Array, text_emb: Array, log_temperature: Array,
                              text_ids: Optional[Array] = None,
                              valid: Optional[Array] = None) -> dict[str, Array]:
  """Per-row terms of the symmetric softmax (CLIP / MuLan) loss; see `softmax_contrastive_loss`.

  Returns:
    {'audio_to_text_loss', 'text_to_audio_loss', 'audio_to_text_correct',
     'text_to_audio_correct', 'valid'}: float32 [batch] each (zeros at invalid rows).
  """
  batch = audio_emb.shape[0]
  logits = similarity_logits(audio_emb, text_emb, log_temperature)
  keep = _valid(valid, batch)
  same = same_text_matrix(text_ids, batch)
  eye = jnp.eye(batch, dtype=jnp.bool_)
  # Pair (i, j) enters both softmaxes when both rows are valid and it is the own pair or the
  # two texts differ (duplicates removed); symmetric, so the transpose serves text -> audio.
  allowed = keep[:, None] & keep[None, :] & (eye | ~same)
  masked = jnp.where(allowed, logits, _NEG)
  diag = jnp.diagonal(logits)
  a2t = jax.nn.logsumexp(masked, axis=1) - diag
  t2a = jax.nn.logsumexp(masked.T, axis=1) - diag
  a2t_ok = jnp.argmax(masked, axis=1) == jnp.arange(batch)
  t2a_ok = jnp.argmax(masked.T, axis=1) == jnp.arange(batch)
  w = keep.astype(jnp.float32)
  return {'audio_to_text_loss': a2t * w, 'text_to_audio_loss': t2a * w,
          'audio_to_text_correct': a2t_ok.astype(jnp.float32) * w,
          'text_to_audio_correct': t2a_ok.astype(jnp.float32) * w, 'valid': w}


def softmax_contrastive_loss(audio_emb: Array, text_emb: Array, log_temperature: Array,
                             text_ids: Optional[Array] = None, valid: Optional[Array] = None
                             ) -> tuple[Array, tuple[Array, Array]]:
  """Symmetric InfoNCE (CLIP, MuLan) over the whole (global) batch.

  logits_ij = exp(log_temperature) * cos(audio_i, text_j); the loss is the mean of the
  audio->text cross entropy (row i's target is text i) and the text->audio one (column j's target
  is audio j), each averaged over (valid) rows. `log_temperature` is the learned log of the
  logit scale (1 / temperature): CLIP starts it at log(1 / 0.07).

  Args:
    audio_emb: [batch, dim] audio embeddings (normalised here).
    text_emb: [batch, dim] text embeddings of the paired captions (normalised here).
    log_temperature: scalar, log of the logit scale.
    text_ids: optional [batch] or [batch, length] text identities; pairs with the same text are
      removed from each other's negatives (see the module docstring).
    valid: optional [batch] bool, false for padding rows.

  Returns:
    (loss, (audio->text accuracy, text->audio accuracy)): float32 scalars; an accuracy is the
    fraction of rows whose best-scoring candidate is their own pair (first index on ties).
  """
  terms = softmax_contrastive_terms(audio_emb, text_emb, log_temperature, text_ids, valid)
  n = jnp.maximum(jnp.sum(terms['valid']), 1.0)
  loss = 0.5 * (jnp.sum(terms['audio_to_text_loss']) + jnp.sum(terms['text_to_audio_loss'])) / n
  return loss, (jnp.sum(terms['audio_to_text_correct']) / n,
                jnp.sum(terms['text_to_audio_correct']) / n)


def sigmoid_contrastive_terms(audio_emb: Array, text_emb: Array, log_temperature: Array,
                              bias: Array, text_ids: Optional[Array] = None,
                              valid: Optional[Array] = None) -> dict[str, Array]:
  """Per-row terms of the SigLIP loss; see `sigmoid_contrastive_loss`.

  Returns:
    {'loss' (the row's sum over its valid pairs), 'audio_to_text_correct',
     'text_to_audio_correct', 'valid'}: float32 [batch] each (zeros at invalid rows).
  """
  batch = audio_emb.shape[0]
  logits = similarity_logits(audio_emb, text_emb, log_temperature) + jnp.asarray(
      bias, jnp.float32)
  keep = _valid(valid, batch)
  positive = same_text_matrix(text_ids, batch) | jnp.eye(batch, dtype=jnp.bool_)
  labels = jnp.where(positive, 1.0, -1.0)
  pair_ok = (keep[:, None] & keep[None, :]).astype(jnp.float32)
  row_loss = jnp.sum(-jax.nn.log_sigmoid(labels * logits) * pair_ok, axis=1)
  w = keep.astype(jnp.float32)
  return {'loss': row_loss * w,
          'audio_to_text_correct': _argmax_hits(logits, positive, keep).astype(jnp.float32) * w,
          'text_to_audio_correct': _argmax_hits(logits.T, positive.T, keep).astype(
              jnp.float32) * w,
          'valid': w}


def sigmoid_contrastive_loss(audio_emb: Array, text_emb: Array, log_temperature: Array,
                             bias: Array, text_ids: Optional[Array] = None,
                             valid: Optional[Array] = None
                             ) -> tuple[Array, tuple[Array, Array]]:
  """SigLIP (Zhai et al., 2023): a binary logistic loss on every (audio, text) pair.

  logits_ij = exp(log_temperature) * cos(audio_i, text_j) + bias; label +1 for a positive pair
  (i == j, or the same text with `text_ids`), -1 otherwise;
  loss = -sum_ij log sigmoid(label_ij * logits_ij) / batch (SigLIP's normalisation: per row,
  summed over all columns). SigLIP starts log_temperature at log(10) and bias at -10.

  Args:
    audio_emb, text_emb, log_temperature, text_ids, valid: as in `softmax_contrastive_loss`
      (duplicates become positives, see the module docstring).
    bias: scalar learned logit bias.

  Returns:
    (loss, (audio->text accuracy, text->audio accuracy)), float32 scalars; an accuracy counts
    rows whose best-scoring candidate is a positive.
  """
  terms = sigmoid_contrastive_terms(audio_emb, text_emb, log_temperature, bias, text_ids,
                                    valid)
  n = jnp.maximum(jnp.sum(terms['valid']), 1.0)
  return jnp.sum(terms['loss']) / n, (jnp.sum(terms['audio_to_text_correct']) / n,
                                      jnp.sum(terms['text_to_audio_correct']) / n)


# ---------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------


def retrieval_ranks(query: Array, keys: Array, text_ids: Optional[Array] = None,
                    valid: Optional[Array] = None) -> Array:
  """0-based rank of each query's own key (key i for query i) among the keys, by cosine.

  Ties are broken by index: a key of equal score counts as ranked ahead when its index is lower
  (the order of a stable sort by decreasing score). Keys holding the same text as the query's
  own key (`text_ids`) are left out of its ranking, and invalid keys too.

  Args:
    query: [n, dim] queries.
    keys: [n, dim] keys (row i is query i's match).
    text_ids: optional [n] or [n, length] text identities (see `same_text_matrix`).
    valid: optional [n] bool.

  Returns:
    int32 [n] ranks (0 = retrieved first); invalid queries get rank n.
  """
  n = query.shape[0]
  scores = jnp.einsum('id,jd->ij', l2_normalize(query), l2_normalize(keys),
                      precision=jax.lax.Precision.HIGHEST)
  keep = _valid(valid, n)
  eye = jnp.eye(n, dtype=jnp.bool_)
  competitors = keep[None, :] & ~eye & ~(same_text_matrix(text_ids, n) & ~eye)
  own = jnp.diagonal(scores)[:, None]
  index = jnp.arange(n)
  ahead = (scores > own) | ((scores == own) & (index[None, :] < index[:, None]))
  ranks = jnp.sum(ahead & competitors, axis=1).astype(jnp.int32)
  return jnp.where(keep, ranks, n)


def recall_at_k(query: Array, keys: Array, k: int, text_ids: Optional[Array] = None,
                valid: Optional[Array] = None) -> Array:
  """Fraction of (valid) queries whose own key is among the top k keys (see `retrieval_ranks`).

  Audio -> text recall is `recall_at_k(audio_emb, text_emb, k)`, text -> audio
  `recall_at_k(text_emb, audio_emb, k)`.

  Returns:
    float32 scalar.
  """
  ranks = retrieval_ranks(query, keys, text_ids, valid)
  w = _valid(valid, query.shape[0]).astype(jnp.float32)
  return jnp.sum((ranks < k).astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)


# ---------------------------------------------------------------------------
# Long audio: windows and their average
# ---------------------------------------------------------------------------


def num_windows(num_samples: int, window_samples: int, hop_samples: int) -> int:
  """Windows covering `num_samples`: 1 + ceil(max(0, samples - window) / hop)."""
  if window_samples <= 0 or hop_samples <= 0:
    raise ValueError(f'window ({window_samples}) and hop ({hop_samples}) must be positive')
  return 1 + -(-max(0, num_samples - window_samples) // hop_samples)


def window_embeddings(audio: Array, window_samples: int, hop_samples: int,
                      lengths: Optional[Array] = None) -> tuple[Array, Array]:
  """Splits clips into windows for embedding (the paper: 10 s windows, 1 s hop, then averaged).

  Window k covers samples [k * hop, k * hop + window). There are
  `num_windows(samples, window, hop)` of them, enough to reach the end of the array; a window
  running past the end is zero-padded. A window counts (mask true) when it lies wholly inside the
  clip, and the first window always counts, so a clip shorter than one window is one
  zero-padded window. A last window that would only partly hold audio is masked out (its audio
  is covered by the windows before it, except for less than one hop of tail). A 25 s clip with
  10 s windows and a 1 s hop gives 16 windows, all counted.

  Args:
    audio: [batch, samples].
    window_samples: samples per window (10 s = 240,000 at 24 kHz).
    hop_samples: samples between window starts (1 s = 24,000).
    lengths: optional [batch] int true lengths of zero-padded clips (default: all `samples`);
      windows past a clip's length are masked out.

  Returns:
    (windows [batch, n_windows, window_samples] in audio's dtype, mask [batch, n_windows] bool).
  """
  audio = jnp.asarray(audio)
  if audio.ndim != 2:
    raise ValueError(f'audio must be [batch, samples], got shape {audio.shape}')
  batch, samples = audio.shape
  n = num_windows(samples, window_samples, hop_samples)
  total = (n - 1) * hop_samples + window_samples
  padded = jnp.pad(audio, ((0, 0), (0, total - samples)))
  index = (np.arange(n)[:, None] * hop_samples + np.arange(window_samples)[None, :])
  windows = padded[:, index]
  if lengths is None:
    lengths = jnp.full((batch,), samples, jnp.int32)
  ends = jnp.asarray(np.arange(n) * hop_samples + window_samples)
  mask = (ends[None, :] <= jnp.asarray(lengths)[:, None]) | (jnp.arange(n) == 0)[None, :]
  return windows, mask


def average_windows(emb: Array, mask: Optional[Array] = None) -> Array:
  """L2-normalised mean of the counted windows' embeddings.

  Args:
    emb: [batch, n_windows, dim] window embeddings.
    mask: [batch, n_windows] bool (from `window_embeddings`); default all windows.

  Returns:
    float32 [batch, dim] unit vectors (a row without counted windows gives zeros).
  """
  emb = jnp.asarray(emb).astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(emb.shape[:2], jnp.bool_)
  w = jnp.asarray(mask).astype(jnp.float32)[..., None]
  mean = jnp.sum(emb * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
  return l2_normalize(mean)


def embed_long_audio(embed_fn: Callable[[Array], Array], audio: Array, window_samples: int,
                     hop_samples: int, lengths: Optional[Array] = None) -> Array:
  """Embeds clips of any length: windows -> `embed_fn` on [batch * n, window] -> average.

  Args:
    embed_fn: [m, window_samples] audio -> [m, dim] embeddings (e.g. a jitted
      `MuLan.embed_audio`).
    audio, window_samples, hop_samples, lengths: see `window_embeddings`.

  Returns:
    float32 [batch, dim] unit vectors.
  """
  windows, mask = window_embeddings(audio, window_samples, hop_samples, lengths)
  batch, n = mask.shape
  emb = embed_fn(windows.reshape(batch * n, window_samples))
  return average_windows(jnp.reshape(emb, (batch, n, -1)), mask)
