"""Tests for jitted KV-cache decoding: prefill, greedy = teacher forcing, guidance, chunks, mesh."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import generate
from musiclm_jax.generate import decoding
from musiclm_jax.generate import sampling
from musiclm_jax.nn import transformer
from musiclm_jax.train.partitioning import Partitioner

CONFIG = transformer.TransformerConfig(
    vocab_size=64, embed_dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64,
    relative_num_buckets=8, relative_max_distance=16)
MODEL = transformer.Decoder(CONFIG)
BATCH, PROMPT, STEPS = 4, 5, 8
# Ids below 4 are "special" and never generated; the sampled runs alternate two "levels".
SEMANTIC_MASK = np.arange(CONFIG.vocab_size) >= 4
LEVELS = sampling.level_vocab_mask(CONFIG.vocab_size, [4, 34], 30)
SAMPLED = dict(temperature=1.0, top_k=20, vocab_mask=LEVELS, phase=1)


@pytest.fixture(scope='module')
def params():
  return MODEL.init(jax.random.key(0), jnp.ones((1, PROMPT + STEPS), jnp.int32))['params']


@pytest.fixture(scope='module')
def prompt():
  return jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 1, CONFIG.vocab_size)


@pytest.fixture(scope='module')
def uncond_prompt(prompt):
  # Dropped conditioning: the first three tokens replaced by a NULL id, length unchanged.
  return prompt.at[:, 1:4].set(1)


@pytest.fixture(scope='module')
def forward(params):
  """Teacher-forced logits of [batch, PROMPT + STEPS] tokens, every position real."""
  fn = jax.jit(lambda t: MODEL.apply({'params': params}, t, segment_ids=jnp.ones_like(t)))
  return lambda tokens: np.asarray(fn(jnp.asarray(tokens, jnp.int32)))


@pytest.fixture(scope='module')
def sampled(params, prompt):
  """The reference sampled run (shared by the seed, guidance, chunk and mesh tests)."""
  return np.asarray(generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7),
                                    **SAMPLED))


@pytest.fixture(scope='module')
def greedy(params, prompt):
  return np.asarray(generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7),
                                    temperature=0.0, vocab_mask=SEMANTIC_MASK))


def test_greedy_decoding_equals_argmax_of_full_forward(greedy, prompt, forward):
  # Re-run the whole model on the sequence so far at every step. Causality makes the
  # positions after the current one irrelevant, so one padded length (one compile) serves.
  tokens = np.zeros((BATCH, PROMPT + STEPS), np.int32)
  tokens[:, :PROMPT] = prompt
  for t in range(STEPS):
    logits = forward(tokens)[:, PROMPT - 1 + t]
    tokens[:, PROMPT + t] = np.argmax(np.where(SEMANTIC_MASK, logits, -np.inf), axis=-1)
  np.testing.assert_array_equal(greedy, tokens[:, PROMPT:])
  assert greedy.dtype == np.int32 and greedy.shape == (BATCH, STEPS)


def test_prefill_and_step_logits_equal_full_forward(params, prompt, sampled, forward):
  # The level mask's rows are runs of 30 ids (from 4 and from 34): a step reads out only the
  # run of the token it draws next, so its logits are the full forward's over that run.
  state = generate.start_decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED)
  assert state.head_width == 30 and np.asarray(state.head_starts).tolist() == [4, 34]
  tokens = np.concatenate([np.asarray(prompt), sampled], axis=1)
  full = forward(tokens)
  run = lambda t: slice(*(lambda s: (s, s + 30))([4, 34][(t + SAMPLED['phase']) % 2]))
  np.testing.assert_allclose(np.asarray(state.logits), full[:, PROMPT - 1, run(0)], atol=1e-5,
                             rtol=1e-5)
  state, _ = generate.decode_steps(MODEL, params, state, 4)
  np.testing.assert_allclose(np.asarray(state.logits), full[:, PROMPT + 3, run(4)], atol=1e-5,
                             rtol=1e-5)
  # A mask whose rows are not runs of one width reads out the whole vocabulary.
  scattered = np.zeros((1, CONFIG.vocab_size), bool)
  scattered[0, 4::2] = True
  state = generate.start_decode(MODEL, params, prompt, STEPS, jax.random.key(7),
                                vocab_mask=scattered)
  assert state.head_width == 0
  np.testing.assert_allclose(np.asarray(state.logits), full[:, PROMPT - 1], atol=1e-5,
                             rtol=1e-5)
  out = np.asarray(generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7),
                                   vocab_mask=scattered))
  assert scattered[0, out].all()


def test_level_read_out_samples_the_masked_whole_vocabulary_distribution(params, prompt):
  # Reading out one run of ids is the masked softmax over the vocabulary, not an
  # approximation (greedy: test_greedy_decoding_equals_argmax_of_full_forward, whose mask is
  # one run too): the first step's token frequencies over 4,000 rows of one prompt match the
  # masked softmax of the full logits at temperature 0.5.
  runs = sampling.level_vocab_mask(CONFIG.vocab_size, [4, 34], 30)
  scattered = runs.copy()
  scattered[:, 0] = True  # id 0 allowed too: not one run a row -> the whole vocabulary
  state = generate.start_decode(MODEL, params, prompt[:1], 1, jax.random.key(7),
                                vocab_mask=scattered)
  assert state.head_width == 0
  full_logits = np.asarray(state.logits, np.float64)[0]
  rows = 4000
  same = jnp.broadcast_to(prompt[:1], (rows, PROMPT))
  first = np.asarray(generate.decode(MODEL, params, same, 1, jax.random.key(3),
                                     temperature=0.5, vocab_mask=runs))[:, 0]
  assert runs[0][first].all()
  masked = np.where(runs[0], full_logits / 0.5, -np.inf)
  probs = np.exp(masked - masked.max())
  probs /= probs.sum()
  counts = np.bincount(first, minlength=CONFIG.vocab_size) / rows
  tv = 0.5 * np.abs(counts - probs).sum()
  # Sampling noise alone: about 0.5 * sum(sqrt(2 p / (pi n))) <= 0.04 here; a read-out of the
  # wrong columns or a wrong normaliser is far off (the distribution is peaked).
  assert probs.max() > 0.1
  assert tv < 0.06, (tv, probs.max())


def test_chunked_decoding_equals_one_shot(params, prompt, sampled):
  reports = []
  chunked = generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED,
                            steps_per_call=4, progress=lambda *a: reports.append(a))
  np.testing.assert_array_equal(np.asarray(chunked), sampled)
  assert reports == [(4, STEPS), (8, STEPS)]
  # By hand, carrying the state; the cache has room for exactly STEPS tokens.
  state = generate.start_decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED)
  state, first = generate.decode_steps(MODEL, params, state, 4)
  state, second = generate.decode_steps(MODEL, params, state, 4)
  np.testing.assert_array_equal(np.concatenate([first, second], axis=1), sampled)
  with pytest.raises(ValueError, match='exceed'):
    generate.decode_steps(MODEL, params, state, 4)


def test_cache_lengths(monkeypatch):
  first = 256
  monkeypatch.setattr(decoding, 'FIRST_CACHE_LENGTH', first)
  assert decoding.cache_lengths(16, 100) == (116,)
  assert decoding.cache_lengths(16, 500) == (first, 516)
  assert decoding.cache_lengths(16, 1000) == (first, 2 * first, 1016)
  assert decoding.cache_lengths(16, 2000) == (first, 2 * first, 4 * first, 2016)
  # No length just below the full one: 16 + 250 is within 5/4 of 256.
  assert decoding.cache_lengths(16, 250) == (266,)
  assert decoding.cache_lengths(16, 304) == (320,)
  assert decoding.cache_lengths(16, 305) == (first, 321)
  # The first length holds the prompt and at least one token.
  assert decoding.cache_lengths(first, 3 * first) == (2 * first, 4 * first)
  assert decoding.cache_lengths(first - 1, 1) == (first,)


def test_growing_cache_decodes_like_a_full_one(params, prompt, sampled, greedy, forward,
                                              monkeypatch):
  # The cache starts at 8 positions (the prompt and 3 tokens) and grows to 13 mid-decode.
  monkeypatch.setattr(decoding, 'FIRST_CACHE_LENGTH', 4)
  assert decoding.cache_lengths(PROMPT, STEPS) == (8, PROMPT + STEPS)
  state = generate.start_decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED)
  assert transformer.decoder_cache_length(state.cache) == 8 and state.packed
  # Rows of the packed cache: batch * heads.
  assert state.cache['layers_0']['self_attention']['cached_key'].shape == (
      BATCH * CONFIG.num_heads, 8, CONFIG.head_dim)
  state, first = generate.decode_steps(MODEL, params, state, 2)
  assert transformer.decoder_cache_length(state.cache) == 8
  state, second = generate.decode_steps(MODEL, params, state, 2)  # grows within the call
  assert transformer.decoder_cache_length(state.cache) == PROMPT + STEPS
  state, rest = generate.decode_steps(MODEL, params, state, 4)
  np.testing.assert_array_equal(np.concatenate([first, second, rest], axis=1), sampled)
  tokens = np.concatenate([np.asarray(prompt), sampled], axis=1)
  next_run = [4, 34][(STEPS + SAMPLED['phase']) % 2]  # the read-out of token STEPS's level
  np.testing.assert_allclose(np.asarray(state.logits),
                             forward(tokens)[:, -1, next_run:next_run + 30], atol=1e-5,
                             rtol=1e-5)
  one_shot = generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED)
  np.testing.assert_array_equal(np.asarray(one_shot), sampled)
  chunked = generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED,
                            steps_per_call=3)  # 9 steps: the cache grows to 14
  np.testing.assert_array_equal(np.asarray(chunked), sampled)
  grown_greedy = generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7),
                                 temperature=0.0, vocab_mask=SEMANTIC_MASK)
  np.testing.assert_array_equal(np.asarray(grown_greedy), greedy)
  # Sharded by a partitioner, the cache stays head-major and grows the same way.
  partitioner = Partitioner(mesh_shape=(2, 2, 2))
  state = generate.start_decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED,
                                partitioner=partitioner)
  assert not state.packed
  assert state.cache['layers_0']['self_attention']['cached_key'].shape == (
      BATCH, CONFIG.num_heads, 8, CONFIG.head_dim)
  state, sharded = generate.decode_steps(MODEL, params, state, STEPS,
                                         partitioner=partitioner)
  assert transformer.decoder_cache_length(state.cache) == PROMPT + STEPS
  np.testing.assert_array_equal(np.asarray(sharded), sampled)


def test_scanned_model_decodes_like_the_unrolled_one(params, prompt, sampled):
  # Decoding runs a scan_layers model unrolled (its stacked layers split once per call).
  scanned = transformer.Decoder(dataclasses.replace(CONFIG, scan_layers=True))
  stacked = {k: v for k, v in nn.unbox(params).items() if not k.startswith('layers_')}
  stacked['layers'] = jax.tree_util.tree_map(
      lambda *layers: jnp.stack(layers),
      *[nn.unbox(params[f'layers_{i}']) for i in range(CONFIG.num_layers)])
  out = generate.decode(scanned, stacked, prompt, STEPS, jax.random.key(7), **SAMPLED,
                        steps_per_call=4)
  np.testing.assert_array_equal(np.asarray(out), sampled)


def test_vocab_mask_is_respected(sampled, greedy):
  # Position t draws from level (t + phase) % 2: phase 1 starts at the second level.
  for t in range(STEPS):
    allowed = LEVELS[(t + SAMPLED['phase']) % 2]
    assert allowed[sampled[:, t]].all(), (t, sampled[:, t])
  assert SEMANTIC_MASK[greedy].all()


def test_seeds(params, prompt, sampled):
  again = generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7), **SAMPLED)
  np.testing.assert_array_equal(np.asarray(again), sampled)
  # Passing the per-row keys explicitly is the same as passing the key they are split from.
  keys = sampling.row_keys(jax.random.key(7), BATCH)
  explicit = generate.decode(MODEL, params, prompt, STEPS, keys, **SAMPLED)
  np.testing.assert_array_equal(np.asarray(explicit), sampled)
  other = generate.decode(MODEL, params, prompt, STEPS, jax.random.key(8), **SAMPLED)
  assert (np.asarray(other) != sampled).any()
  # Rows are independent: one prompt in every row still gives different continuations.
  same = jnp.broadcast_to(prompt[:1], prompt.shape)
  rows = np.asarray(generate.decode(MODEL, params, same, STEPS, jax.random.key(7), **SAMPLED))
  assert len({tuple(r) for r in rows}) > 1
  # A row's tokens depend on its own key only: a permuted batch with permuted keys agrees.
  perm = np.array([2, 0, 3, 1])
  permuted = generate.decode(MODEL, params, prompt[perm], STEPS, keys[perm], **SAMPLED)
  np.testing.assert_array_equal(np.asarray(permuted), sampled[perm])


@pytest.fixture(scope='module')
def guided(params, prompt, uncond_prompt):
  return lambda scale, p=prompt: np.asarray(generate.decode(
      MODEL, params, p, STEPS, jax.random.key(7), **SAMPLED, guidance_scale=scale,
      uncond_prompt=uncond_prompt))


def test_guidance_one_is_conditional_and_zero_unconditional(params, uncond_prompt, sampled,
                                                            guided):
  np.testing.assert_array_equal(guided(1.0), sampled)
  unconditional = generate.decode(MODEL, params, uncond_prompt, STEPS, jax.random.key(7),
                                  **SAMPLED)
  np.testing.assert_array_equal(guided(0.0), np.asarray(unconditional))
  strong = guided(3.0)
  assert (strong != sampled).any()
  for t in range(STEPS):
    assert LEVELS[(t + SAMPLED['phase']) % 2][strong[:, t]].all()
  # Per-row scales: each row as if decoded with its own scale.
  per_row = guided(jnp.array([1.0, 0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(per_row[0::2], sampled[0::2])
  np.testing.assert_array_equal(per_row[1::2], np.asarray(unconditional)[1::2])


def test_left_padded_prompt_decodes_like_the_short_prompt(params, prompt):
  padded = prompt.at[1, :2].set(0)
  mask = jnp.ones(prompt.shape, bool).at[1, :2].set(False)
  out = generate.decode(MODEL, params, padded, STEPS, jax.random.key(7), temperature=0.0,
                        vocab_mask=SEMANTIC_MASK, prompt_mask=mask)
  short = generate.decode(MODEL, params, prompt[1:2, 2:], STEPS, jax.random.key(7),
                          temperature=0.0, vocab_mask=SEMANTIC_MASK)
  np.testing.assert_array_equal(np.asarray(out)[1], np.asarray(short)[0])
  for bad in (~mask, mask.at[2, 3].set(False)):  # right padding, a hole
    with pytest.raises(ValueError, match='left padding'):
      generate.decode(MODEL, params, prompt, STEPS, jax.random.key(7), prompt_mask=bad)


def test_decode_chunks_rejoins_chunks_in_time_order(params, prompt, sampled):
  prompts = prompt.reshape(2, 2, PROMPT)  # 2 examples of 2 chunks
  out = np.asarray(generate.decode_chunks(MODEL, params, prompts, STEPS, jax.random.key(7),
                                          **SAMPLED))
  assert out.shape == (2, 2 * STEPS)
  # Each example's chunks get keys split from the example's key.
  example_keys = sampling.row_keys(jax.random.key(7), 2)
  chunk_keys = jnp.concatenate([jax.random.split(k, 2) for k in example_keys])
  flat = np.asarray(generate.decode(MODEL, params, prompt, STEPS, chunk_keys, **SAMPLED))
  for b in range(2):
    for c in range(2):
      np.testing.assert_array_equal(out[b, c * STEPS:(c + 1) * STEPS], flat[2 * b + c])


def test_eight_devices_equal_one(params, prompt, uncond_prompt, sampled, greedy, guided):
  partitioner = Partitioner(mesh_shape=(2, 2, 2))
  # Boxed parameters are placed by their logical axes (here: fsdp and model shards).
  boxed = MODEL.init(jax.random.key(0), jnp.ones((1, PROMPT + STEPS), jnp.int32))['params']
  assert isinstance(boxed['layers_0']['mlp']['wi']['kernel'], nn.LogicallyPartitioned)
  sharded_greedy = generate.decode(MODEL, boxed, prompt, STEPS, jax.random.key(7),
                                   temperature=0.0, vocab_mask=SEMANTIC_MASK,
                                   partitioner=partitioner)
  assert sharded_greedy.sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_array_equal(np.asarray(sharded_greedy), greedy)
  # Sampled with guidance (8 rows [cond; uncond] on the mesh); scale 1 == the plain run.
  sharded = generate.decode(MODEL, boxed, prompt, STEPS, jax.random.key(7), **SAMPLED,
                            guidance_scale=jnp.array([1.0, 2.0, 1.0, 2.0]),
                            uncond_prompt=uncond_prompt, partitioner=partitioner)
  reference = guided(jnp.array([1.0, 2.0, 1.0, 2.0]))
  np.testing.assert_array_equal(np.asarray(sharded), reference)
  np.testing.assert_array_equal(np.asarray(sharded)[0::2], sampled[0::2])


def test_errors(params, prompt, uncond_prompt):
  decode = lambda **kw: generate.decode(  # pylint: disable=g-long-lambda
      MODEL, params, kw.pop('prompt', prompt), kw.pop('num_steps', STEPS),
      jax.random.key(0), **kw)
  with pytest.raises(ValueError, match='positive'):
    decode(num_steps=0)
  with pytest.raises(ValueError, match='allow no token'):
    decode(vocab_mask=np.zeros((2, CONFIG.vocab_size), bool))
  with pytest.raises(ValueError, match='uncond_prompt'):
    decode(guidance_scale=3.0)
  with pytest.raises(ValueError, match='must equal the prompt shape'):
    decode(uncond_prompt=uncond_prompt[:, 1:], guidance_scale=3.0)
  with pytest.raises(ValueError, match='P >= 1'):
    decode(prompt=prompt[:, :0])
  with pytest.raises(ValueError, match='ids must lie'):
    decode(prompt=prompt.at[0, 0].set(CONFIG.vocab_size))
  with pytest.raises(ValueError, match='steps_per_call'):
    decode(progress=print)
  with pytest.raises(ValueError, match='temperature'):
    decode(temperature=-1.0)
