"""Jitted KV-cache decoding of a stage LM: prefill, sampling loop, guidance, chunks, sharding.

Every stage of MusicLM is a decoder-only `transformer.Decoder` over one flat vocabulary: a
prompt (BOS, conditioning tokens, earlier-stage tokens) is continued by `num_steps` sampled
tokens. `decode` runs the prefill and then the whole sampling loop without a host round trip;
`start_decode` + `decode_steps` cut the loop into jitted chunks that carry the cache, for
callers that want progress reports (a host callback inside the loop would stall the device
on every token); `decode_chunks` decodes independent prompts of one example as a batch (the
fine stage's 3 s chunks).

Speed: a step attends over the whole KV cache, so the cache grows with the tokens (256, 512,
1024, ... positions, up to P + num_steps: `cache_lengths`) and a step costs what the length
decoded so far needs, not the final length; the loop is a jitted while loop per cache length
(compiled once per length, shared by decodes of any length). Without a partitioner the cache
is packed ([batch * heads, length, head_dim], `transformer.pack_decoder_cache`): the attention
dots then read it in place, where XLA:CPU would copy a 4-D cache on every step. A scan_layers
model is decoded unrolled (`transformer.unroll_layers`), its stacked weights split once per
call rather than sliced on every step. When every row of the vocab mask is one run of
consecutive ids of one width (an RVQ level's codes: `sampling.row_slices`), a step reads out
only those columns (`transformer.readout_columns`: 1,024 of the fine stage's 12,416), so the
read-out and the sampling over it cost a level, not the vocabulary.

Conventions:
  * Every prompt token is a real key, including a BOS of id 0 (as in training, where the
    padding mask comes from the targets). Prompts of one batch have one length P; shorter
    prompts are left-padded and marked with `prompt_mask` (false = padding). With T5
    relative position biases a left-padded row decodes exactly like the unpadded prompt.
  * Randomness: row b draws token t from `fold_in(keys[b], t)`, so a fixed `rng` gives fixed
    tokens, rows are independent, and a row's draws depend neither on the other rows nor on
    the mesh nor on how the steps are cut into chunks (its tokens can then only differ
    through the last-bit rounding of the forward pass in another batch shape or mesh, which
    flips a draw only at a near tie).
  * Classifier-free guidance: the conditional and unconditional prompts (equal length: the
    unconditional one replaces each conditioning token by a NULL id) run as one batch
    [cond; uncond]; the sampler sees `scale * log_softmax(cond) + (1 - scale) *
    log_softmax(uncond)` (= uncond + scale * (cond - uncond)), and both rows are fed the
    token drawn. Written this way the combination is exact (no rounding) at scale 1 and 0,
    which then sample exactly like the conditional and the unconditional prompt alone.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax import lax

from musiclm_jax.generate import sampling
from musiclm_jax.nn import transformer

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class DecodeState:
  """What a decode carries from one jitted chunk of steps to the next (a pytree).

  Attributes:
    cache: the Decoder's 'cache' collection, rows [cond; uncond] when guided; packed
      (`transformer.pack_decoder_cache`) when `packed`. It holds the prompt and the tokens fed
      so far and grows through `cache_lengths(prompt_length, max_steps)` as they fill it.
    logits: [rows, vocab] float32 logits of the next token; with `head_width`, [rows,
      head_width]: the logits of the ids [head_starts[r], + head_width) only, r = the next
      token's mask row.
    step: int32 scalar, tokens generated so far.
    keys: [batch] per-row PRNG keys.
    temperature, top_k, top_p, guidance_scale: [batch] per-row sampling settings.
    vocab_mask: bool [period, vocab]; generated token t is drawn from row
      (t + phase) % period.
    phase: int32 scalar.
    head_starts: int32 [period], the first id of each mask row's run (used with head_width).
    guided: static, whether rows hold [cond; uncond] pairs.
    filtering: static, whether top-k / top-p are applied (False when disabled everywhere).
    greedy: static, whether every row has temperature 0 (no random draws at all).
    top_k_bound: static, `sampling.top_k_bound_for` the rows' top-k (0: rank the vocabulary).
    max_steps: static, how many tokens the cache grows to have room for.
    prompt_length: static, the prompt length P (the cache's first positions).
    packed: static, whether the cache is packed (it is, unless sharded by a partitioner).
    head_width: static; > 0: every mask row is one run of this many consecutive ids, and the
      logits are those of the run only; 0: the whole vocabulary.
  """
  cache: PyTree
  logits: Array
  step: Array
  keys: Array
  temperature: Array
  top_k: Array
  top_p: Array
  guidance_scale: Array
  vocab_mask: Array
  phase: Array
  head_starts: Array
  guided: bool = flax.struct.field(pytree_node=False, default=False)
  filtering: bool = flax.struct.field(pytree_node=False, default=True)
  greedy: bool = flax.struct.field(pytree_node=False, default=False)
  top_k_bound: int = flax.struct.field(pytree_node=False, default=0)
  max_steps: int = flax.struct.field(pytree_node=False, default=0)
  prompt_length: int = flax.struct.field(pytree_node=False, default=0)
  packed: bool = flax.struct.field(pytree_node=False, default=False)
  head_width: int = flax.struct.field(pytree_node=False, default=0)

  def head_start(self, step: Array) -> Array:
    """The first id of the run that token `step` is drawn from (with head_width)."""
    return self.head_starts[(step + self.phase) % self.head_starts.shape[0]]

  @property
  def batch_size(self) -> int:
    return self.keys.shape[0]


# Sharding context of the traced functions: (mesh, logical axis rules) or None. Static, so that
# a function traced under one mesh and rule set is never reused under another.
_Sharding = Optional[tuple[Any, tuple]]


def _rules_context(sharding: _Sharding):
  return nn.logical_axis_rules(sharding[1]) if sharding else contextlib.nullcontext()


_CACHE_AXES = {
    'cached_key': ('batch', 'heads', 'length', 'kv'),
    'cached_value': ('batch', 'heads', 'length', 'kv'),
    'key_mask': ('batch', 'length'),
}


def _constrain_cache(cache: PyTree, packed: bool) -> PyTree:
  """Pins the cache's layout (batch over 'data', heads over 'model') across loop iterations.

  A packed cache is never sharded (it is used without a partitioner), so it is left as is.
  """
  if packed:
    return cache

  def constrain(path, leaf):
    axes = _CACHE_AXES.get(getattr(path[-1], 'key', None))
    if axes is None:
      return leaf
    if leaf.ndim == len(axes) + 1:  # scan_layers: a leading layer axis
      axes = ('layers',) + axes
    return nn.with_logical_constraint(leaf, axes)

  return jax.tree_util.tree_map_with_path(constrain, cache)


# The first cache length; it then doubles until it reaches P + max_steps (see cache_lengths).
# A length of at least P + max_steps allocates the whole cache at once.
FIRST_CACHE_LENGTH = 256
# Pack the cache (transformer.pack_decoder_cache) when no partitioner shards it: the
# head-major layout makes XLA:CPU copy the whole cache on every step.
PACK_CACHE = True


def cache_lengths(prompt_length: int, max_steps: int) -> tuple[int, ...]:
  """The lengths a decode's cache grows through: 256, 512, 1024, ..., P + max_steps.

  A decode step attends over the whole cache (the unfilled slots masked), so its cost grows
  with the cache length: the cache starts at FIRST_CACHE_LENGTH positions (or more, to hold
  the prompt and one token) and doubles whenever the next token would not fit, until it
  holds P + max_steps. Every step thus attends over fewer than twice the positions filled
  (or FIRST_CACHE_LENGTH). The sampling loop is compiled once per length: the lengths are
  FIRST_CACHE_LENGTH times powers of two (shared by decodes of any length), then
  P + max_steps, which replaces the last power when within 5/4 of it (no compiled loop for
  a handful of steps).
  """
  final = prompt_length + max_steps
  lengths = []
  length = FIRST_CACHE_LENGTH
  while 4 * final > 5 * length:
    if length > prompt_length:  # room for the prompt and at least one token
      lengths.append(length)
    length *= 2
  return tuple(lengths) + (final,)


def _forward(model: transformer.Decoder, params: PyTree, cache: PyTree, tokens: Array,
             packed: bool, segment_ids: Optional[Array] = None, *, head_start=None,
             head_width: int = 0) -> tuple[Array, PyTree]:
  """Appends `tokens` [rows, n] to the cache; returns the logits of the last one and the cache
  (with `head_width`, the logits of ids [head_start, head_start + head_width) only)."""
  out, mutated = model.apply({'params': params, 'cache': cache}, tokens,
                             segment_ids=segment_ids, decode=True, mutable=['cache'],
                             features_only=head_width > 0)
  out = out[:, -1]
  if head_width:
    columns = transformer.readout_columns(model.config, params, head_start, head_width)
    out = jnp.dot(out.astype(columns.dtype), columns).astype(jnp.float32)
  return out, _constrain_cache(mutated['cache'], packed)


def _start_impl(params, prompt_rows, segment_ids, keys, temperature, top_k, top_p,
                guidance_scale, vocab_mask, phase, head_starts, *, model, max_steps,
                cache_length, packed, guided, filtering, greedy, top_k_bound, head_width,
                sharding) -> DecodeState:
  with _rules_context(sharding):
    model, params = transformer.unroll_layers(model, params)
    rows, prompt_length = prompt_rows.shape
    cache = _constrain_cache(
        transformer.init_decoder_cache(model, rows, cache_length, packed=packed), packed)
    prompt_rows = nn.with_logical_constraint(prompt_rows, ('batch', 'length'))
    state = DecodeState(
        cache=cache, logits=jnp.zeros(()), step=jnp.zeros((), jnp.int32), keys=keys,
        temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
        vocab_mask=vocab_mask, phase=phase, head_starts=head_starts, guided=guided,
        filtering=filtering, greedy=greedy, top_k_bound=top_k_bound, max_steps=max_steps,
        prompt_length=prompt_length, packed=packed, head_width=head_width)
    # Prefill: the whole prompt in one pass, causal within the chunk.
    logits, cache = _forward(model, params, cache, prompt_rows, packed, segment_ids,
                             head_start=state.head_start(state.step), head_width=head_width)
    return state.replace(cache=cache, logits=logits)


def _choose(state: DecodeState, logits: Array) -> Array:
  """Samples the next token [batch] of every row from the next-token logits [rows, vocab]."""
  scores = jax.nn.log_softmax(logits, axis=-1)
  if state.guided:
    cond, uncond = jnp.split(scores, 2, axis=0)
    scale = state.guidance_scale[:, None]
    # Equal to uncond + scale * (cond - uncond), and exact at scale 0 and 1.
    scores = scale * cond + (1.0 - scale) * uncond
  if state.head_width:  # the logits are those of the row's run of ids, every one allowed
    start, allowed = state.head_start(state.step), None
  else:
    period = state.vocab_mask.shape[0]
    start, allowed = 0, state.vocab_mask[(state.step + state.phase) % period][None, :]
  step_keys = None if state.greedy else jax.vmap(jax.random.fold_in, in_axes=(0, None))(
      state.keys, state.step)
  return start + sampling.sample(
      step_keys, scores, state.temperature, state.top_k, state.top_p, allowed,
      filtering=state.filtering, greedy=state.greedy, top_k_bound=state.top_k_bound)


def _steps_impl(params, state: DecodeState, tokens: Array, stop: Array, *, model, sharding
                ) -> tuple[DecodeState, Array]:
  """Generates tokens state.step .. stop - 1 within the cache as it is.

  `tokens` [batch, cache length] holds the tokens by position: token t goes to column
  prompt_length + t, where it is fed. `stop` is traced (a while loop), so one compiled loop
  serves every stretch of steps at one cache length, whatever the decode's length.
  """
  with _rules_context(sharding):
    # Split once per call: inside the loop a scanned model would copy its stacked layer
    # weights and caches on every step.
    unrolled, params = transformer.unroll_layers(model, params)

    def body(carry):
      cache, logits, step, tokens = carry
      current = state.replace(step=step)
      token = _choose(current, logits)
      feed = jnp.concatenate([token, token]) if state.guided else token
      # The last token of the last chunk is fed too (the cache has room for max_steps): one
      # extra forward per decode keeps every step identical, whichever way steps are chunked.
      logits, cache = _forward(unrolled, params, cache, feed[:, None], state.packed,
                               head_start=state.head_start(step + 1),
                               head_width=state.head_width)
      tokens = lax.dynamic_update_slice(tokens, token[:, None],
                                        (jnp.int32(0), state.prompt_length + step))
      return cache, logits, step + 1, tokens

    cache, logits, step, tokens = lax.while_loop(
        lambda carry: carry[2] < stop, body, (state.cache, state.logits, state.step, tokens))
    tokens = nn.with_logical_constraint(tokens, ('batch', 'length'))
    return state.replace(cache=cache, logits=logits, step=step), tokens


def _grow_impl(state: DecodeState, tokens: Array, *, length, sharding
               ) -> tuple[DecodeState, Array]:
  """Grows the cache and the token buffer to `length` positions."""
  with _rules_context(sharding):
    cache = transformer.resize_decoder_cache(state.cache, length)
    tokens = jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1])))
    tokens = nn.with_logical_constraint(tokens, ('batch', 'length'))
    return state.replace(cache=_constrain_cache(cache, state.packed)), tokens


def _window_impl(tokens: Array, start: Array, *, size, sharding) -> Array:
  with _rules_context(sharding):
    window = lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
    return nn.with_logical_constraint(window, ('batch', 'length'))


_start_jit = jax.jit(
    _start_impl,
    static_argnames=('model', 'max_steps', 'cache_length', 'packed', 'guided', 'filtering',
                     'greedy', 'top_k_bound', 'head_width', 'sharding'))
# The state (mostly the cache) is donated: each stretch of steps updates it in place.
_steps_jit = jax.jit(_steps_impl, static_argnames=('model', 'sharding'),
                     donate_argnames=('state', 'tokens'))
_grow_jit = jax.jit(_grow_impl, static_argnames=('length', 'sharding'))
_window_jit = jax.jit(_window_impl, static_argnames=('size', 'sharding'))


def _advance(model, params, state: DecodeState, done: int, num_steps: int, sharding
             ) -> tuple[DecodeState, Array]:
  """Generates tokens done .. done + num_steps - 1, growing the cache as they need.

  One jitted loop per cache length the steps reach (see `cache_lengths`): the steps at a
  length attend over that many positions, not over the final cache. The loops depend on the
  cache length only, so decodes of other lengths (or other chunkings) reuse them.
  """
  prompt_length = state.prompt_length
  tokens = jnp.zeros((state.batch_size, transformer.decoder_cache_length(state.cache)),
                     jnp.int32)
  low = 0
  for length in cache_lengths(prompt_length, state.max_steps):
    # Token t is fed at position prompt_length + t: these tokens fit in `length` positions.
    first, stop = max(done, low - prompt_length), min(done + num_steps, length - prompt_length)
    low = length
    if first >= stop:
      continue
    if tokens.shape[1] < length:
      state, tokens = _grow_jit(state, tokens, length=length, sharding=sharding)
    state, tokens = _steps_jit(params, state, tokens, jnp.int32(stop), model=model,
                               sharding=sharding)
  return state, _window_jit(tokens, jnp.int32(prompt_length + done), size=num_steps,
                            sharding=sharding)


def _host_values(value) -> Optional[np.ndarray]:
  """`value` as numpy when it is concrete (for checks and static choices), else None."""
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def _sharding_of(partitioner) -> _Sharding:
  return None if partitioner is None else (partitioner.mesh, tuple(partitioner.rules))


def _place(partitioner, params: PyTree, arrays: dict[str, Array]) -> tuple[PyTree, dict]:
  """Unboxes params (sharding boxed ones by their logical axes) and shards arrays by batch."""
  if partitioner is None:
    return meta.unbox(params), arrays
  is_boxed = any(isinstance(leaf, meta.AxisMetadata) for leaf in jax.tree_util.tree_leaves(
      params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)))
  if is_boxed:
    shardings = jax.tree_util.tree_map(
        partitioner.sharding, partitioner.mesh_specs_from_boxed(params),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = jax.device_put(meta.unbox(params), shardings)
  placed = {}
  for name, value in arrays.items():
    if value is None:
      placed[name] = None
      continue
    axes = ('batch',) + (None,) * (value.ndim - 1)
    placed[name] = jax.device_put(value, partitioner.logical_sharding(axes))
  return params, placed


def start_decode(model: transformer.Decoder,
                 params: PyTree,
                 prompt: Array,
                 max_steps: int,
                 rng: Array,
                 temperature: sampling.ArrayLike = 1.0,
                 top_k: sampling.ArrayLike = 0,
                 top_p: sampling.ArrayLike = 1.0,
                 vocab_mask: Optional[sampling.ArrayLike] = None,
                 *,
                 phase: int = 0,
                 guidance_scale: sampling.ArrayLike = 1.0,
                 uncond_prompt: Optional[Array] = None,
                 prompt_mask: Optional[Array] = None,
                 partitioner=None) -> DecodeState:
  """Prefills the cache with the prompt (one jitted call); continue with `decode_steps`.

  Args:
    model: the stage's `transformer.Decoder`.
    params: its parameters (the Decoder's own tree, e.g. a DecoderOnlyLM's params['model']),
      boxed or not. Under a partitioner pass them sharded as the trainer holds them, or
      boxed (they are then placed by their logical axes).
    prompt: int32 [batch, P], P >= 1 (BOS, conditioning, earlier-stage tokens); all rows one
      length (left-pad with `prompt_mask` for shorter ones).
    max_steps: how many tokens will be generated at most (the cache grows to hold
      P + max_steps).
    rng: one PRNG key (split into one key per row) or [batch] keys.
    temperature: scalar or [batch]; 0 = greedy.
    top_k: scalar or [batch]; 0 = no top-k.
    top_p: scalar or [batch]; 1 = no nucleus filtering.
    vocab_mask: None (all ids allowed) or bool [period, vocab] (or [vocab]): generated token t
      (counted from 0 at the first generated token) may only take ids allowed by row
      (t + phase) % period. E.g. the coarse stage: period 4, row l = the ids of RVQ level l.
    phase: offset into the vocab mask period of the first generated token.
    guidance_scale: scalar or [batch], classifier-free guidance scale (needs
      `uncond_prompt`); 1 = conditional, 0 = unconditional, > 1 = guided.
    uncond_prompt: int32 [batch, P], the prompt with its conditioning replaced by NULL ids.
    prompt_mask: optional bool [batch, P], false at the left padding of shorter prompts
      (shared by `uncond_prompt`); the last position must be real.
    partitioner: optional `Partitioner`: the batch is split over its 'batch' rule (data,
      fsdp), heads over 'model', as its logical-axis rules say. Pass it rather than calling
      under its `context()` (its rules are part of what the jitted functions are cached on);
      without one, call outside any mesh context.

  Returns:
    The `DecodeState` before the first generated token.

  Raises:
    ValueError: bad shapes, max_steps <= 0, ids outside the vocabulary, a negative
      temperature or top_k, a vocab mask row allowing nothing, a guidance scale other than 1
      without an unconditional prompt, a prompt mask that is not a left padding.
  """
  prepared = _prepare_inputs(model, prompt, max_steps, rng, temperature, top_k, top_p,
                             vocab_mask, phase, guidance_scale, uncond_prompt, prompt_mask)
  return _run(model, params, *prepared, partitioner=partitioner, one_shot=False)


def _prepare_inputs(model, prompt, max_steps, rng, temperature, top_k, top_p, vocab_mask,
                    phase, guidance_scale, uncond_prompt, prompt_mask):
  """Checks the inputs of `start_decode` and brings them to their per-row device form."""
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f'prompt must be int32 [batch, P] with P >= 1 (at least a BOS), got '
                     f'shape {prompt.shape}')
  batch, prompt_length = prompt.shape
  if not isinstance(max_steps, (int, np.integer)) or max_steps <= 0:
    raise ValueError(f'max_steps / num_steps must be a positive int, got {max_steps!r}')
  max_steps = int(max_steps)
  vocab = model.config.vocab_size
  vocab_mask = sampling.check_vocab_mask(vocab_mask, vocab)
  prompt_values = _host_values(prompt)
  if prompt_values is not None and (prompt_values.min() < 0 or prompt_values.max() >= vocab):
    raise ValueError(f'prompt ids must lie in [0, {vocab}), got [{prompt_values.min()}, '
                     f'{prompt_values.max()}]')

  guided = uncond_prompt is not None
  scale_values = _host_values(guidance_scale)
  if not guided and (scale_values is None or np.any(scale_values != 1.0)):
    raise ValueError(f'guidance_scale {guidance_scale!r} needs an uncond_prompt (without one '
                     'only 1, plain conditional sampling, is possible)')
  rows = prompt
  if guided:
    uncond_prompt = jnp.asarray(uncond_prompt, jnp.int32)
    if uncond_prompt.shape != prompt.shape:
      raise ValueError(f'uncond_prompt shape {uncond_prompt.shape} must equal the prompt '
                       f'shape {prompt.shape} (drop conditioning by NULL ids, not by '
                       'removing tokens)')
    rows = jnp.concatenate([prompt, uncond_prompt], axis=0)

  segment_ids = None
  if prompt_mask is not None:
    prompt_mask = jnp.asarray(prompt_mask, jnp.bool_)
    if prompt_mask.shape != prompt.shape:
      raise ValueError(f'prompt_mask shape {prompt_mask.shape} must equal the prompt shape '
                       f'{prompt.shape}')
    mask_values = _host_values(prompt_mask)
    if mask_values is not None and (not mask_values[:, -1].all() or
                                    np.any(np.diff(mask_values.astype(np.int8), axis=1) < 0)):
      raise ValueError('prompt_mask must be false...false true...true in every row, ending '
                       'true: only left padding is supported')
    segment_ids = prompt_mask.astype(jnp.int32)
    if guided:
      segment_ids = jnp.concatenate([segment_ids, segment_ids], axis=0)

  # Static shortcuts, taken only when the host sees the settings of every row.
  top_k_values, top_p_values = _host_values(top_k), _host_values(top_p)
  filtering = (top_k_values is None or top_p_values is None or np.any(top_k_values > 0)
               or np.any(top_p_values < 1.0))
  temperature_values = _host_values(temperature)
  greedy = temperature_values is not None and bool(np.all(temperature_values == 0))
  if temperature_values is not None and np.any(temperature_values < 0):
    raise ValueError(f'temperature must be >= 0 (0 = greedy), got {temperature!r}')
  if top_k_values is not None and np.any(top_k_values < 0):
    raise ValueError(f'top_k must be >= 0 (0 = no top-k), got {top_k!r}')
  keys = sampling.row_keys(rng, batch)
  per_row = lambda v, dtype: sampling.per_row(v, batch, dtype)
  args = dict(
      keys=keys, temperature=per_row(temperature, jnp.float32),
      top_k=per_row(top_k, jnp.int32), top_p=per_row(top_p, jnp.float32),
      guidance_scale=per_row(guidance_scale, jnp.float32),
      vocab_mask=jnp.asarray(vocab_mask), phase=jnp.asarray(phase, jnp.int32))
  # Rows that are runs of consecutive ids of one width (RVQ levels): read out only the run.
  runs = sampling.row_slices(vocab_mask)
  head_width = runs[1] if runs is not None and runs[1] < vocab else 0
  args['head_starts'] = jnp.asarray(runs[0] if head_width else
                                    np.zeros(vocab_mask.shape[0], np.int32))
  top_k_bound = sampling.top_k_bound_for(top_k_values, head_width or vocab)
  return rows, segment_ids, args, max_steps, dict(guided=guided, filtering=filtering,
                                                  greedy=greedy, top_k_bound=top_k_bound,
                                                  head_width=head_width)


def _run(model, params, rows, segment_ids, args, max_steps, flags, *, partitioner,
         one_shot: bool):
  """Places the inputs and calls the jitted start, and for a one-shot decode all max_steps."""
  params, placed = _place(partitioner, params, {'rows': rows, 'segment_ids': segment_ids})
  sharding = _sharding_of(partitioner)
  context = partitioner.context() if partitioner is not None else contextlib.nullcontext()
  with context:
    state = _start_jit(params, placed['rows'], placed['segment_ids'], **args, model=model,
                       max_steps=max_steps,
                       cache_length=cache_lengths(rows.shape[1], max_steps)[0],
                       packed=PACK_CACHE and sharding is None, sharding=sharding, **flags)
    if one_shot:
      return _advance(model, params, state, 0, max_steps, sharding)[1]
    return state


def decode_steps(model: transformer.Decoder, params: PyTree, state: DecodeState,
                 num_steps: int, *, partitioner=None) -> tuple[DecodeState, Array]:
  """Generates the next `num_steps` tokens (a jitted loop per cache length they reach).

  The state is donated (its cache updated in place): use the returned state, not the old one.
  The check that the cache has room reads `state.step` back to the host, which waits for the
  previous chunk (the caller of a progress bar waits for it anyway).

  Returns:
    (new state, int32 [batch, num_steps] tokens).
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps <= 0:
    raise ValueError(f'num_steps must be a positive int, got {num_steps!r}')
  done = int(jax.device_get(state.step))
  if done + num_steps > state.max_steps:
    raise ValueError(f'{done} tokens generated, {num_steps} more exceed the '
                     f'{state.max_steps} the cache was sized for (start_decode max_steps)')
  params = meta.unbox(params) if partitioner is None else _place(partitioner, params, {})[0]
  context = partitioner.context() if partitioner is not None else contextlib.nullcontext()
  with context:
    return _advance(model, params, state, done, int(num_steps), _sharding_of(partitioner))


def decode(model: transformer.Decoder,
           params: PyTree,
           prompt: Array,
           num_steps: int,
           rng: Array,
           temperature: sampling.ArrayLike = 1.0,
           top_k: sampling.ArrayLike = 0,
           top_p: sampling.ArrayLike = 1.0,
           vocab_mask: Optional[sampling.ArrayLike] = None,
           *,
           phase: int = 0,
           guidance_scale: sampling.ArrayLike = 1.0,
           uncond_prompt: Optional[Array] = None,
           prompt_mask: Optional[Array] = None,
           partitioner=None,
           steps_per_call: Optional[int] = None,
           progress: Optional[Callable[[int, int], None]] = None) -> Array:
  """Continues `prompt` by `num_steps` sampled tokens.

  By default the prefill and the whole loop are dispatched at once (a jitted while loop per
  cache length, see `cache_lengths`; the cache grows to P + num_steps), with no host round
  trip. With `steps_per_call`, the loop is cut into calls of that many steps that carry the
  cache (`start_decode` + `decode_steps`), and `progress(done, num_steps)` is called on the
  host after each: a progress bar at the cost of one host round trip per call. Both ways make
  the same draws, step for step (see the module docstring on randomness). The cache is then
  sized for a whole number of calls (the surplus tokens are dropped).

  Args:
    model, params, prompt, rng, temperature, top_k, top_p, vocab_mask, phase,
      guidance_scale, uncond_prompt, prompt_mask, partitioner: as in `start_decode`.
    num_steps: how many tokens to generate (> 0).
    steps_per_call: None (one call) or the number of steps per jitted call.
    progress: optional `progress(done, total)`; needs `steps_per_call`.

  Returns:
    int32 [batch, num_steps] generated ids (sharded over the batch under a partitioner).
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps <= 0:
    raise ValueError(f'num_steps must be a positive int, got {num_steps!r}')
  if progress is not None and steps_per_call is None:
    raise ValueError('progress needs steps_per_call (there is no host callback inside the '
                     'jitted loop)')
  if steps_per_call is None:
    prepared = _prepare_inputs(model, prompt, num_steps, rng, temperature, top_k, top_p,
                               vocab_mask, phase, guidance_scale, uncond_prompt, prompt_mask)
    return _run(model, params, *prepared, partitioner=partitioner, one_shot=True)
  kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_mask=vocab_mask,
                phase=phase, guidance_scale=guidance_scale, uncond_prompt=uncond_prompt,
                prompt_mask=prompt_mask, partitioner=partitioner)
  if not isinstance(steps_per_call, (int, np.integer)) or steps_per_call <= 0:
    raise ValueError(f'steps_per_call must be a positive int, got {steps_per_call!r}')
  calls = math.ceil(num_steps / steps_per_call)
  state = start_decode(model, params, prompt, calls * steps_per_call, rng, **kwargs)
  pieces = []
  for call in range(calls):
    state, tokens = decode_steps(model, params, state, steps_per_call, partitioner=partitioner)
    pieces.append(tokens)
    if progress is not None:
      progress(min((call + 1) * steps_per_call, num_steps), num_steps)
  return jnp.concatenate(pieces, axis=1)[:, :num_steps]


def decode_chunks(model: transformer.Decoder,
                  params: PyTree,
                  prompts: Array,
                  num_steps: int,
                  rng: Array,
                  temperature: sampling.ArrayLike = 1.0,
                  top_k: sampling.ArrayLike = 0,
                  top_p: sampling.ArrayLike = 1.0,
                  vocab_mask: Optional[sampling.ArrayLike] = None,
                  *,
                  uncond_prompts: Optional[Array] = None,
                  prompt_mask: Optional[Array] = None,
                  **kwargs) -> Array:
  """Decodes independent chunks of each example as one batch and joins their outputs.

  The fine stage continues each 3 s chunk of coarse tokens by that chunk's fine tokens,
  independently of the other chunks: the chunks of all examples are decoded as rows of one
  batch and the outputs re-joined in time order.

  Args:
    prompts: int32 [batch, chunks, P], the prompt of every chunk.
    num_steps: tokens generated per chunk.
    rng: one key, or [batch] keys (each example's chunks get keys split from its key).
    temperature, top_k, top_p: scalars or [batch] (shared by an example's chunks).
    vocab_mask: as in `decode`; every chunk's output starts at `phase` of its period.
    uncond_prompts: optional int32 [batch, chunks, P] for classifier-free guidance.
    prompt_mask: optional bool [batch, chunks, P].
    **kwargs: the other `decode` arguments (phase, guidance_scale as a scalar or [batch],
      partitioner, steps_per_call, progress).

  Returns:
    int32 [batch, chunks * num_steps]: chunk c's tokens at [c * num_steps, (c+1) * num_steps).
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 3:
    raise ValueError(f'prompts must be [batch, chunks, P], got shape {prompts.shape}')
  batch, chunks, prompt_length = prompts.shape
  rows = batch * chunks
  keys = sampling.row_keys(rng, batch)
  chunk_keys = jax.vmap(lambda k: jax.random.split(k, chunks))(keys).reshape(rows)

  def per_chunk(value, dtype):
    value = sampling.per_row(value, batch, dtype)
    return jnp.repeat(value, chunks)

  def flat(value, dtype):
    if value is None:
      return None
    value = jnp.asarray(value, dtype)
    if value.shape != prompts.shape:
      raise ValueError(f'expected shape {prompts.shape}, got {value.shape}')
    return value.reshape(rows, prompt_length)

  if 'guidance_scale' in kwargs:
    kwargs['guidance_scale'] = per_chunk(kwargs['guidance_scale'], jnp.float32)
  tokens = decode(model, params, prompts.reshape(rows, prompt_length), num_steps, chunk_keys,
                  per_chunk(temperature, jnp.float32), per_chunk(top_k, jnp.int32),
                  per_chunk(top_p, jnp.float32), vocab_mask,
                  uncond_prompt=flat(uncond_prompts, jnp.int32),
                  prompt_mask=flat(prompt_mask, jnp.bool_), **kwargs)
  return tokens.reshape(batch, chunks * num_steps)
