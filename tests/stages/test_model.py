"""The stage LM: masked teacher-forced loss, conditioning dropout, per-level metrics, meshes, sizes."""
from __future__ import annotations

import dataclasses
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.nn.transformer import TransformerConfig
from musiclm_jax.stages import spec as spec_lib
from musiclm_jax.stages.model import StageModel, describe_model
from musiclm_jax.stages.spec import TokenSizes
from musiclm_jax.train.models import cross_entropy_with_integer_labels
from musiclm_jax.train.optimizers import OptimizerConfig
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.mesh_steps import one_step

SIZES = TokenSizes(semantic_codes=6, codec_levels=3, codec_codes=5, coarse_levels=2,
                   mulan_levels=2, mulan_codes=4, melody_levels=2, melody_codes=3,
                   melody_frames=2)
CONFIG = TransformerConfig(vocab_size=0, embed_dim=32, num_layers=1, num_heads=4, head_dim=8,
                           mlp_dim=64, dropout_rate=0.0)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


def _model(spec=None, **kwargs):
  spec = spec or spec_lib.coarse_stage_spec(SIZES)
  kwargs.setdefault('vocab_multiple', 8)
  return StageModel(spec, CONFIG, **kwargs)


def _prefix_lm_batch(spec, streams, length):
  """What seqio's PrefixLMFeatureConverter gives for unpacked examples (checked in test_data)."""
  tokens, weights = spec.flatten(streams)
  b, n = tokens.shape
  targets = np.zeros((b, length), np.int32)
  targets[:, :n] = tokens
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  loss_weights = np.zeros_like(targets)
  loss_weights[:, :n] = weights
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_loss_weights': loss_weights}


def _coarse_streams(batch, seed=0, frames=2):
  rng = np.random.default_rng(seed)
  return {'mulan': rng.integers(0, SIZES.mulan_codes, (batch, SIZES.mulan_levels)),
          'semantic': rng.integers(0, SIZES.semantic_codes, (batch, frames)),
          'coarse': rng.integers(0, SIZES.codec_codes, (batch, 2 * frames, 2))}


def test_teacher_forced_loss_is_the_masked_cross_entropy_of_the_predicted_stream():
  model = _model(z_loss=0.0, level_softmax=False)
  spec = model.spec
  assert model.config.vocab_size == 32 and spec.vocab_size == 26  # rounded up to 8
  batch = _prefix_lm_batch(spec, _coarse_streams(3), length=16)  # 2 + 2 + 8 = 12 real positions
  params = {'model': model.module.init(jax.random.PRNGKey(0),
                                       jnp.asarray(batch['decoder_input_tokens']))['params']}
  logits = np.asarray(jax.jit(model.logits)(params, batch), np.float64)
  # By hand: log-softmax, the target's log-probability, weights 1 on the 8 coarse tokens only.
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - logits.max(-1, keepdims=True)
  targets = batch['decoder_target_tokens']
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  mask = np.zeros(targets.shape)
  mask[:, 4:12] = 1.0
  expected = np.sum(nll * mask) / np.sum(mask)
  expected_accuracy = np.sum((logits.argmax(-1) == targets) * mask) / np.sum(mask)
  compute_losses = jax.jit(model.compute_losses)
  losses, metrics, _ = compute_losses(params, {}, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(losses['model'], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], expected_accuracy, rtol=1e-6)
  # Loss weights that also cover the prefix (the plain LM converter) change nothing.
  lm_batch = dict(batch, decoder_loss_weights=(targets > 0).astype(np.int32))
  np.testing.assert_allclose(compute_losses(params, {}, lm_batch, jax.random.PRNGKey(1))[0]
                             ['model'], expected, rtol=1e-5)
  # Per-level evaluation: coarse levels 1 and 2 alternate in the predicted part.
  ratios = jax.device_get(jax.jit(model.eval_metrics)(params, {}, batch))
  np.testing.assert_allclose(ratios['loss'][0] / ratios['loss'][1], expected, rtol=1e-5)
  for level, columns in ((1, [4, 6, 8, 10]), (2, [5, 7, 9, 11])):
    level_mask = np.zeros_like(mask)
    level_mask[:, columns] = 1.0
    num, den = ratios[f'loss/level_{level}']
    assert den == 12
    np.testing.assert_allclose(num / den, np.sum(nll * level_mask) / 12, rtol=1e-5)
    assert f'accuracy/level_{level}' in ratios
  assert 'loss_unconditional' in ratios and ratios['loss_unconditional'][1] == 24
  assert model.num_tokens(batch) == 24


def test_level_softmax_normalises_each_position_over_its_own_levels_ids():
  model = _model(z_loss=0.0)  # level_softmax is the default
  spec = model.spec
  batch = _prefix_lm_batch(spec, _coarse_streams(3, seed=4), length=16)
  params = {'model': model.module.init(jax.random.PRNGKey(2),
                                       jnp.asarray(batch['decoder_input_tokens']))['params']}
  logits = np.asarray(jax.jit(model.logits)(params, batch), np.float64)
  targets = batch['decoder_target_tokens']
  # By hand: predicted positions 4..11 alternate levels 1, 2; level l's ids are
  # [offset + 5 l, offset + 5 (l + 1)) (5 codes a level). Each position's log-softmax runs over
  # those 5 ids only, the sampler's mask row for that level.
  offset = spec.offset('coarse')
  vocab_mask = spec.vocab_mask(model.config.vocab_size)
  nll, hits = np.zeros(targets.shape), np.zeros(targets.shape)
  for column in range(4, 12):
    level = (column - 4) % 2
    ids = np.arange(offset + 5 * level, offset + 5 * level + 5)
    np.testing.assert_array_equal(np.flatnonzero(vocab_mask[level]), ids)
    sub = logits[:, column, ids]
    log_z = np.log(np.sum(np.exp(sub - sub.max(-1, keepdims=True)), -1)) + sub.max(-1)
    nll[:, column] = log_z - logits[np.arange(3), column, targets[:, column]]
    hits[:, column] = ids[sub.argmax(-1)] == targets[:, column]
  mask = np.zeros(targets.shape)
  mask[:, 4:12] = 1.0
  expected = np.sum(nll * mask) / np.sum(mask)
  losses, metrics, _ = jax.jit(model.compute_losses)(params, {}, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(losses['model'], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], np.sum(hits * mask) / np.sum(mask), rtol=1e-6)
  # Below the whole-vocabulary loss, and at most log(5) for a uniform guess: the restriction
  # is real, not a relabelling.
  full = _model(z_loss=0.0, level_softmax=False)
  full_loss = jax.jit(full.compute_losses)(params, {}, batch, jax.random.PRNGKey(1))[0]['model']
  assert float(losses['model']) < float(full_loss)
  ratios = jax.device_get(jax.jit(model.eval_metrics)(params, {}, batch))
  np.testing.assert_allclose(ratios['loss'][0] / ratios['loss'][1], expected, rtol=1e-5)
  level_1 = np.zeros_like(mask)
  level_1[:, [4, 6, 8, 10]] = 1.0
  num, den = ratios['loss/level_1']
  np.testing.assert_allclose(num / den, np.sum(nll * level_1) / 12, rtol=1e-5)
  # The gradient never reaches an id outside the position's level.
  grad = jax.grad(lambda lg: model.restrict_logits(lg, jnp.asarray(targets)).sum())(
      jnp.asarray(logits, jnp.float32))
  np.testing.assert_array_equal(np.asarray(grad)[0, 4] != 0, vocab_mask[0])
  np.testing.assert_array_equal(np.asarray(grad)[0, 0], 1.0)  # a prefix position: untouched


def _packed_batch(model, spec):
  """Two rows, each packing two examples (the second's levels start mid-row), and init params."""
  rng = np.random.default_rng(7)
  if spec.name == 'coarse':
    # 17 then 12 tokens: the first's levels start at an odd position, the second's 17 later.
    streams = [_coarse_streams(2, seed=5, frames=3), _coarse_streams(2, seed=6, frames=2)]
  else:
    streams = [{'coarse': rng.integers(0, SIZES.codec_codes, (2, 3, 2)),
                'fine': rng.integers(0, SIZES.codec_codes, (2, 3, 1))} for _ in range(2)]
  one = [_prefix_lm_batch(spec, s, length=20) for s in streams]
  n = [int(np.sum(b['decoder_target_tokens'][0] > 0)) for b in one]
  length = 32
  batch = {k: np.zeros((2, length), np.int32) for k in one[0]}
  batch['decoder_segment_ids'] = np.zeros((2, length), np.int32)
  at = 0
  for seg, (b, size) in enumerate(zip(one, n), start=1):
    for key in one[0]:
      batch[key][:, at:at + size] = b[key][:, :size]
    batch['decoder_segment_ids'][:, at:at + size] = seg
    at += size
  params = {'model': model.module.init(jax.random.PRNGKey(3),
                                       jnp.asarray(batch['decoder_input_tokens']))['params']}
  return batch, params


def test_level_head_equals_the_masked_whole_vocabulary_softmax_on_packed_rows():
  # The level head reads out only each level's columns, grouping a row's positions by level; on
  # rows packing two examples (the second's levels start mid-row) and for the fine stage (whose
  # prefix is itself codec levels) it must give the masked whole-vocabulary softmax's numbers.
  for spec in (spec_lib.coarse_stage_spec(SIZES), spec_lib.fine_stage_spec(SIZES)):
    model = _model(spec, z_loss=1e-3)
    batch, params = _packed_batch(model, spec)
    targets = jnp.asarray(batch['decoder_target_tokens'])

    def reference(b, p=params):
      logits = model.restrict_logits(model.logits(p, b), b['decoder_target_tokens'])
      return cross_entropy_with_integer_labels(logits, b['decoder_target_tokens'],
                                               model.loss_weights(b), 1e-3)

    loss_sum, correct, weight = jax.jit(reference)(batch)
    assert float(weight) == float(np.sum(spec.target_levels(np.asarray(targets)) >= 0))
    losses, metrics, _ = jax.jit(model.compute_losses)(params, {}, batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(losses['model'], loss_sum / weight, rtol=1e-5)
    np.testing.assert_allclose(metrics['accuracy'], correct / weight, rtol=1e-6)
    ratios = jax.device_get(jax.jit(model.eval_metrics)(params, {}, batch))
    assert float(ratios['loss'][1]) == float(weight)
    # The head's gradient equals the reference's (the read-out columns it never reads get 0).
    ref_grad = jax.grad(lambda p: reference(batch, p)[0] / weight)(params)
    head_grad = jax.grad(
        lambda p: model.compute_losses(p, {}, batch, jax.random.PRNGKey(1))[0]['model'])(params)
    for a, b in zip(jax.tree.leaves(ref_grad), jax.tree.leaves(head_grad)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_window_start_weights_count_frames_from_each_packed_examples_first_predicted_token():
  # start_weight multiplies frame f's loss weight by 1 + A exp(-f / decay), f counted from 0 in
  # each packed example's predicted stream; 'loss/window_start' is the unweighted loss over
  # frames < start_frames, conditioned and not.
  for spec in (spec_lib.coarse_stage_spec(SIZES), spec_lib.fine_stage_spec(SIZES)):
    model = _model(spec, z_loss=1e-3, start_weight=3.0, start_decay=1.5, start_frames=2)
    batch, params = _packed_batch(model, spec)
    targets = batch['decoder_target_tokens']
    predicted = spec.target_levels(targets) >= 0
    expected = np.full(targets.shape, -1)
    for row in range(targets.shape[0]):
      for seg in (1, 2):
        where = np.flatnonzero(predicted[row] & (batch['decoder_segment_ids'][row] == seg))
        expected[row, where] = np.arange(len(where)) // spec.period
    assert expected.max() >= 2  # frames past start_frames exist
    np.testing.assert_array_equal(jax.jit(model.predicted_frames)(batch), expected)

    def reference(b, weights, p=params):
      logits = model.restrict_logits(model.logits(p, b), b['decoder_target_tokens'])
      return cross_entropy_with_integer_labels(logits, b['decoder_target_tokens'], weights,
                                               1e-3)

    boost = np.where(expected >= 0, 1.0 + 3.0 * np.exp(-np.maximum(expected, 0) / 1.5), 1.0)
    weights = np.asarray(model.loss_weights(batch)) * boost
    loss_sum, _, weight = jax.jit(reference)(batch, jnp.asarray(weights, jnp.float32))
    losses, _, _ = jax.jit(model.compute_losses)(params, {}, batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(losses['model'], loss_sum / weight, rtol=1e-5)
    start = np.asarray(model.loss_weights(batch)) * ((expected >= 0) & (expected < 2))
    metrics = jax.device_get(jax.jit(model.eval_metrics)(params, {}, batch))
    # eval uses no z-loss: compare against the reference without it.
    logits = model.restrict_logits(model.logits(params, batch), jnp.asarray(targets))
    s_sum, _, s_weight = cross_entropy_with_integer_labels(logits, jnp.asarray(targets),
                                                           jnp.asarray(start, jnp.float32))
    np.testing.assert_allclose(metrics['loss/window_start'][0], s_sum, rtol=1e-5)
    assert float(metrics['loss/window_start'][1]) == float(s_weight) == float(np.sum(start))
    full = metrics['loss'][1]
    assert float(full) == float(np.sum(np.asarray(model.loss_weights(batch))))  # eval unweighted


def test_conditioning_dropout_replaces_whole_streams_at_rate_p_and_never_the_targets():
  spec = spec_lib.semantic_stage_spec(SIZES)  # mulan 2 + melody 2x2 prefix -> semantic
  model = _model(spec, conditioning_dropout=0.3)
  rows, length = 4096, 16
  rng = np.random.default_rng(3)
  streams = {'mulan': rng.integers(0, 4, (rows, 2)), 'melody': rng.integers(0, 3, (rows, 2, 2)),
             'semantic': rng.integers(0, 6, (rows, 4))}
  batch = _prefix_lm_batch(spec, streams, length)  # 2 + 4 + 4 = 10 real positions
  dropped, rates = jax.jit(model.drop_conditioning)(batch, jax.random.PRNGKey(7))
  targets, inputs = np.asarray(dropped['decoder_target_tokens']), np.asarray(
      dropped['decoder_input_tokens'])
  original = batch['decoder_target_tokens']
  mulan_null = targets[:, :2] == spec.null_id('mulan')
  melody_null = targets[:, 2:6] == spec.null_id('melody')
  # All-or-nothing per example and stream, and only NULL or the original ids.
  assert (mulan_null.all(1) | ~mulan_null.any(1)).all()
  assert (melody_null.all(1) | ~melody_null.any(1)).all()
  np.testing.assert_array_equal(np.where(mulan_null, original[:, :2], targets[:, :2]),
                                original[:, :2])
  np.testing.assert_array_equal(np.where(melody_null, original[:, 2:6], targets[:, 2:6]),
                                original[:, 2:6])
  # The predicted tokens and the padding are never touched; the inputs are the shifted targets.
  np.testing.assert_array_equal(targets[:, 6:], original[:, 6:])
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  assert (inputs[:, 0] == 0).all()
  # Rate p per stream, independent streams (4-sigma bounds for 4096 examples).
  p_mulan, p_melody = mulan_null[:, 0].mean(), melody_null[:, 0].mean()
  sigma = np.sqrt(0.3 * 0.7 / rows)
  assert abs(p_mulan - 0.3) < 4 * sigma and abs(p_melody - 0.3) < 4 * sigma
  assert abs((mulan_null[:, 0] & melody_null[:, 0]).mean() - 0.09) < 4 * np.sqrt(0.09 / rows)
  np.testing.assert_allclose(rates['dropped/mulan'], p_mulan, rtol=1e-6)
  # Packed rows: each segment (example) decides alone.
  seg = np.zeros((rows, length), np.int32)
  seg[:, :8], seg[:, 8:] = 1, 2
  packed = {k: v.copy() for k, v in batch.items()}
  for key in ('decoder_target_tokens', 'decoder_input_tokens'):
    packed[key][:, 8:] = packed[key][:, :8]  # a second copy of the first 8 positions
  packed['decoder_input_tokens'][:, 8] = 0  # its own BOS
  packed['decoder_segment_ids'] = seg
  out, _ = jax.jit(model.drop_conditioning)(packed, jax.random.PRNGKey(8))
  out_targets = np.asarray(out['decoder_target_tokens'])
  first = out_targets[:, 0] == spec.null_id('mulan')
  second = out_targets[:, 8] == spec.null_id('mulan')
  assert (first == (out_targets[:, 1] == spec.null_id('mulan'))).all()
  assert (second == (out_targets[:, 9] == spec.null_id('mulan'))).all()
  assert abs(np.mean(first != second) - 2 * 0.3 * 0.7) < 4 * np.sqrt(0.42 * 0.58 / rows)
  # The fine stage has nothing to drop: its batches pass unchanged.
  fine = _model(spec_lib.fine_stage_spec(SIZES), conditioning_dropout=0.5)
  same, none = fine.drop_conditioning(batch, jax.random.PRNGKey(0))
  assert none == {} and same['decoder_target_tokens'] is batch['decoder_target_tokens']


def test_vocab_size_that_does_not_fit_the_spec_raises():
  spec = spec_lib.coarse_stage_spec(SIZES)
  with pytest.raises(ValueError, match=r"TransformerConfig.vocab_size=10 is smaller than stage "
                                       r"'coarse' needs \(26 ids\)"):
    StageModel(spec, dataclasses.replace(CONFIG, vocab_size=10))
  assert StageModel(spec, dataclasses.replace(CONFIG, vocab_size=40)).config.vocab_size == 40


def test_one_step_on_a_2x1x4_mesh_equals_one_device():
  """Conditioning dropout on (p = 0.5): its draws, and so the step, do not depend on the mesh."""
  model = _model(conditioning_dropout=0.5,
                 optimizer=OptimizerConfig(name='sgd', learning_rate=0.5, schedule='constant'))
  batch = _prefix_lm_batch(model.spec, _coarse_streams(8, seed=1), length=16)
  spec = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32) for k, v in batch.items()}
  single = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                         spec)
  mesh = StepFunctions(model, Partitioner(mesh_shape=(2, 1, 4)), spec)
  state_1, metrics_1 = one_step(single, batch)
  state_8, metrics_8 = one_step(mesh, batch)
  assert 0.0 < metrics_1['dropped/mulan'] < 1.0
  for key in ('loss', 'accuracy', 'dropped/mulan', 'grad_norm/model'):
    np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=2e-5, atol=1e-6, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         state_8.params, state_1.params)


@pytest.mark.parametrize('stage,low,high', [('semantic', 425e6, 435e6),
                                            ('coarse', 433e6, 443e6),
                                            ('fine', 423e6, 433e6)])
def test_paper_stage_from_gin_has_about_430m_parameters(stage, low, high):
  main.parse_gin(['models/stages/paper.gin'], [f'StageModel.spec = @{stage}_stage_spec()'])
  model = StageModel()  # pylint: disable=no-value-for-parameter
  cfg = model.config
  assert (cfg.num_layers, cfg.num_heads, cfg.embed_dim, cfg.mlp_dim, cfg.dropout_rate) == (
      24, 16, 1024, 4096, 0.1)
  count = model.num_params()
  print(describe_model(model))
  assert low < count < high, count


def test_tiny_stage_from_gin_is_small():
  main.parse_gin(['models/stages/tiny.gin'], ['StageModel.spec = @coarse_stage_spec()'])
  model = StageModel()  # pylint: disable=no-value-for-parameter
  print(describe_model(model))
  assert model.spec.stream('mulan').codebook_size == 64 and model.spec.vocab_size == 4994
  assert model.num_params() < 2e6


@pytest.mark.parametrize('stage,crop', [('semantic', 10.0), ('coarse', 2.0), ('fine', 1.0)])
def test_example_gin_files_build_the_stage_and_its_lengths(stage, crop):
  """The tiny CPU experiment files parse; their model, spec and data lengths agree."""
  main.parse_gin([f'examples/{stage}_stage_tiny_cpu.gin'], ["MODEL_DIR = '/tmp/unused'"])
  model = StageModel()  # pylint: disable=no-value-for-parameter
  assert model.spec == spec_lib.STAGE_SPECS[stage]()  # TokenSizes from models/stages/tiny.gin
  assert model.spec.name == stage and gin.query_parameter('%CROP_SECONDS') == crop
  lengths = spec_lib.stage_feature_lengths()  # pylint: disable=no-value-for-parameter
  assert lengths == model.spec.feature_lengths(crop)
  assert gin.query_parameter('train.time_limit_seconds') <= 1200


def test_tokenize_example_names_the_tiny_models():
  main.parse_gin(['examples/tokenize_stage_tokens_tiny_cpu.gin'], ["CACHE_DIR = '/tmp/unused'"])
  from musiclm_jax.stages.tokens import stage_token_model_dirs  # pylint: disable=g-import-not-at-top
  assert stage_token_model_dirs() == {'semantic_tokenizer_dir': 'runs/semantic_tokenizer_tiny',
                                      'codec_dir': 'runs/codec_tiny',
                                      'mulan_conditioner_dir': 'runs/mulan_conditioner_tiny',
                                      'melody_conditioner_dir': 'runs/melody_conditioner_tiny'}
  assert gin.query_parameter('%TASKS') == ['embedded_music_stage_tokens']
