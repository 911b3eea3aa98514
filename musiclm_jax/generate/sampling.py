"""Next-token sampling: allowed-vocabulary mask, temperature, top-k, top-p, per-row PRNG keys."""
from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ArrayLike = Union[Array, np.ndarray, float, int]


def check_vocab_mask(vocab_mask: Optional[ArrayLike], vocab_size: int) -> np.ndarray:
  """Validates an allowed-vocabulary mask on the host; returns it as bool [period, vocab].

  Args:
    vocab_mask: None (every id allowed, period 1), or bool [vocab] / [period, vocab]: row
      `(t + phase) % period` lists the ids generated position t may take.
    vocab_size: the model's vocabulary size.

  Raises:
    ValueError: wrong shape, or a row allowing no id at all (the position could only
      produce garbage).
  """
  if vocab_mask is None:
    return np.ones((1, vocab_size), bool)
  if isinstance(vocab_mask, jax.core.Tracer):
    raise ValueError('vocab_mask must be concrete (it is checked on the host)')
  mask = np.asarray(vocab_mask)
  if mask.dtype != np.bool_:
    raise ValueError(f'vocab_mask must be boolean, got {mask.dtype}')
  if mask.ndim == 1:
    mask = mask[None]
  if mask.ndim != 2 or mask.shape[1] != vocab_size or mask.shape[0] < 1:
    raise ValueError(f'vocab_mask must have shape [period, {vocab_size}], got {mask.shape}')
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f'vocab_mask rows {empty.tolist()} (of period {mask.shape[0]}) allow no '
                     'token id')
  return mask


def level_vocab_mask(vocab_size: int, offsets: list[int], level_size: int) -> np.ndarray:
  """The mask of a frame-major stream of RVQ levels: row l allows [offsets[l], +level_size).

  E.g. the coarse stage's 4 levels of 1024 codes placed after the special ids:
  `level_vocab_mask(vocab, [o, o + 1024, o + 2048, o + 3072], 1024)`.
  """
  mask = np.zeros((len(offsets), vocab_size), bool)
  for level, offset in enumerate(offsets):
    if offset < 0 or offset + level_size > vocab_size:
      raise ValueError(f'level {level}: ids [{offset}, {offset + level_size}) exceed the '
                       f'vocabulary of {vocab_size}')
    mask[level, offset:offset + level_size] = True
  return mask


def row_slices(mask: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
  """(first ids int32 [period], width) when every row of a checked bool [period, vocab] mask
  allows one run of consecutive ids, all runs of one width; else None.

  The sampler then reads out only those `width` columns a step (`decoding`): a stage's
  per-level mask (`level_vocab_mask`) is of this form.
  """
  starts, widths = [], []
  for row in np.asarray(mask, bool):
    ids = np.flatnonzero(row)
    if ids.size == 0 or ids[-1] - ids[0] + 1 != ids.size:
      return None
    starts.append(ids[0])
    widths.append(ids.size)
  if len(set(widths)) != 1:
    return None
  return np.asarray(starts, np.int32), int(widths[0])


def per_row(value: ArrayLike, batch: int, dtype) -> Array:
  """A scalar or [batch] setting as a [batch] array."""
  value = jnp.asarray(value, dtype)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (batch,))
  if value.shape != (batch,):
    raise ValueError(f'expected a scalar or shape ({batch},), got {value.shape}')
  return value


def _filter(log_probs: Array, temperature: Array, top_k: Array, top_p: Array,
            top_k_bound: int = 0) -> Array:
  """Tempered log-probabilities with the ids removed by top-k and top-p at -inf.

  Args:
    log_probs: [batch, vocab], disallowed ids already at -inf.
    temperature: [batch]; rows at 0 are divided by 1 (their caller takes the argmax).
    top_k: [batch] int, 0 = no limit.
    top_p: [batch], 1 = no limit.
    top_k_bound: static; 0 ranks the whole vocabulary (a sort). K > 0 is the caller's promise
      that every row's top_k is in [1, K]: then only the K best ids are ranked
      (`lax.top_k`, a partial selection instead of a sort of the vocabulary). Top-p acts on
      what top-k leaves, so it never needs more than those K.

  Returns:
    [batch, vocab] in vocabulary order.
  """
  batch, vocab = log_probs.shape
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  logits = log_probs / safe_t[:, None]
  ids = lax.broadcasted_iota(jnp.int32, (batch, vocab), 1)
  if top_k_bound > 0:
    # lax.top_k returns the K largest in descending order, equal values by ascending index:
    # the same ranking as the stable sort below, cut at K.
    width = min(int(top_k_bound), vocab)
    sorted_logits, sorted_ids = lax.top_k(logits, width)
    sorted_ids = sorted_ids.astype(jnp.int32)
    num_k = jnp.clip(top_k, 1, width)
  else:
    # Rank ids by descending value, ties by ascending id (a stable sort of the negated
    # values), so that "the top k" is always exactly k ids.
    width = vocab
    neg_sorted, sorted_ids = lax.sort((-logits, ids), dimension=1, num_keys=1, is_stable=True)
    sorted_logits = -neg_sorted
    num_k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  rank = lax.broadcasted_iota(jnp.int32, (batch, width), 1)
  in_top_k = rank < num_k[:, None]
  # Nucleus on the distribution left by temperature and top-k: the smallest prefix whose
  # probability reaches top_p, i.e. the ids whose predecessors sum to less than top_p (an
  # exclusive cumulative sum never decreases, so this is a prefix).
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
  before = jnp.concatenate([jnp.zeros((batch, 1), probs.dtype),
                            jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
  num_p = jnp.where(top_p >= 1.0, width, jnp.sum(before < top_p[:, None], axis=-1))
  # At least the most probable id survives (top_p <= 0 acts as greedy).
  keep = jnp.maximum(jnp.minimum(num_k, num_p), 1)
  # The kept set is a prefix of the sorted order; express its end as a (value, id) threshold
  # so the result stays in vocabulary order without inverting the permutation.
  cut = (keep - 1)[:, None]
  cut_value = jnp.take_along_axis(sorted_logits, cut, axis=-1)
  cut_id = jnp.take_along_axis(sorted_ids, cut, axis=-1)
  kept = (logits > cut_value) | ((logits == cut_value) & (ids <= cut_id))
  return jnp.where(kept, logits, -jnp.inf)


def _prepare(logits: Array, temperature: ArrayLike, top_k: ArrayLike, top_p: ArrayLike,
             allowed: Optional[Array]) -> tuple[Array, Array, Array, Array]:
  if logits.ndim != 2:
    raise ValueError(f'logits must be [batch, vocab], got shape {logits.shape}')
  batch = logits.shape[0]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if allowed is not None:
    allowed = jnp.broadcast_to(jnp.asarray(allowed, jnp.bool_), logits.shape)
    log_probs = jnp.where(allowed, log_probs, -jnp.inf)
  return (log_probs, per_row(temperature, batch, jnp.float32),
          per_row(top_k, batch, jnp.int32), per_row(top_p, batch, jnp.float32))


def filter_logits(logits: Array, temperature: ArrayLike = 1.0, top_k: ArrayLike = 0,
                  top_p: ArrayLike = 1.0, allowed: Optional[Array] = None, *,
                  top_k_bound: int = 0) -> Array:
  """The logits `sample` draws from, in vocabulary order, removed ids at -inf.

  Applied in this order: log-softmax, the allowed mask, division by the temperature, top-k,
  then top-p on the softmax of what is left (the order of Hugging Face's sampler).

  Args:
    logits: [batch, vocab] unnormalised scores.
    temperature: scalar or [batch]; > 0 (a row at 0 is returned untempered: `sample` takes
      its argmax).
    top_k: scalar or [batch]; keep the k most probable ids (exactly k, ties broken in favour
      of the lower id); 0 keeps all.
    top_p: scalar or [batch] in (0, 1]; keep the smallest set of most probable ids whose
      probability reaches top_p; 1 keeps all; <= 0 keeps only the most probable id.
    allowed: optional bool [vocab] or [batch, vocab]; false ids are never kept.
    top_k_bound: static; K > 0 promises that every row's top_k is in [1, K] and ranks only
      the K best ids (`lax.top_k`) instead of sorting the vocabulary: the same result, cheaper
      (`top_k_bound_for` picks K from the host's settings). 0: sort.

  Returns:
    [batch, vocab] float32 tempered log-probabilities, -inf outside the kept set.
  """
  return _filter(*_prepare(logits, temperature, top_k, top_p, allowed),
                 top_k_bound=top_k_bound)


def top_k_bound_for(top_k: Optional[np.ndarray], vocab_size: int) -> int:
  """The static `top_k_bound` for top-k settings seen on the host (0 when a sort is needed).

  Every row must limit top-k (a row at 0, or settings the host cannot see, needs the whole
  vocabulary ranked for its top-p). The bound is rounded up to a power of two, so nearby
  settings share one compiled function.
  """
  if top_k is None:
    return 0
  values = np.asarray(top_k).reshape(-1)
  if values.size == 0 or np.any(values <= 0):
    return 0
  bound = 1 << int(np.max(values) - 1).bit_length()
  return 0 if bound >= vocab_size else bound


def sample(keys: Optional[Array], logits: Array, temperature: ArrayLike = 1.0,
           top_k: ArrayLike = 0, top_p: ArrayLike = 1.0, allowed: Optional[Array] = None, *,
           filtering: bool = True, greedy: bool = False, top_k_bound: int = 0) -> Array:
  """Draws one id per row: categorical over `filter_logits`, argmax where temperature == 0.

  Args:
    keys: [batch] PRNG keys, one per row, so a row's draw depends on its own key only (not
      on the batch size, on the other rows, or on how the batch is sharded).
    logits: [batch, vocab] unnormalised scores.
    temperature, top_k, top_p, allowed: as in `filter_logits`.
    filtering: False skips top-k and top-p (and their sort of the vocabulary): a static
      shortcut for callers that know top_k == 0 and top_p >= 1 in every row, which then
      gives the same draws as True.
    greedy: True skips the random draw (`keys` may be None): a static shortcut for callers
      that know every row's temperature is 0, which then gives the same ids as False.
    top_k_bound: as in `filter_logits` (static).

  Returns:
    int32 [batch] ids; always allowed ids when `allowed` allows at least one per row.
  """
  log_probs, temperature, top_k, top_p = _prepare(logits, temperature, top_k, top_p, allowed)
  argmax = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  if greedy:
    return argmax
  if keys is None or keys.shape != (log_probs.shape[0],):
    raise ValueError(f'expected {log_probs.shape[0]} keys, got '
                     f'{None if keys is None else keys.shape}')
  if filtering:
    tempered = _filter(log_probs, temperature, top_k, top_p, top_k_bound=top_k_bound)
  else:
    tempered = log_probs / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  sampled = jax.vmap(jax.random.categorical)(keys, tempered).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, argmax)


def row_keys(rng: Array, batch: int) -> Array:
  """One PRNG key per row: `rng` itself when it is already [batch] keys, else split.

  Accepts new-style typed keys and legacy uint32[2] keys (and batches of either).
  """
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
      raise ValueError(f'rng must be a PRNG key (or uint32[..., 2] raw key), got {rng.dtype} '
                       f'{rng.shape}')
    rng = jax.random.wrap_key_data(rng)
  if rng.shape == ():
    return jax.random.split(rng, batch)
  if rng.shape == (batch,):
    return rng
  raise ValueError(f'rng must be one key or {batch} keys (one per row), got shape {rng.shape}')
