"""w2v-BERT: masking, the losses against numpy references, frame rate, one step on a mesh."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.semantic import w2v_bert
from musiclm_jax.semantic.model import W2VBertModel
from musiclm_jax.train.models import cross_entropy_with_integer_labels
from musiclm_jax.train.optimizers import OptimizerConfig
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.mesh_steps import one_step

FRAMES = 12
SAMPLES = 960 * FRAMES
TINY = dict(front_end=LogMelFrontEnd(n_mels=16), conv_channels=4, quantizer_logit_init_scale=1.0, embed_dim=32, num_heads=2,
            head_dim=16, mlp_dim=64, num_contrastive_layers=1, num_mlm_layers=2,
            codebook_size=16, codebook_dim=8, projection_dim=8)


def _network(**overrides):
  return w2v_bert.W2VBert(**{**TINY, **overrides})


def _model(**overrides):
  kwargs = dict(network=_network(), optimizer=OptimizerConfig(name='sgd', learning_rate=0.1),
                mask_prob=0.2, mask_span=3, num_negatives=5)
  kwargs.update(overrides)
  return W2VBertModel(**kwargs)


def _audio(n=8, samples=SAMPLES, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / 24000.0
  freqs = rng.uniform(110, 880, (n, 1))
  return (0.4 * np.sin(2 * np.pi * freqs * t) + 0.05 * rng.standard_normal((n, samples))
          ).astype(np.float32)


# ------------------------------------------------------------------ masking


def _runs(row):
  """(start, length) of the maximal runs of True in a bool row."""
  runs, start = [], None
  for i, v in enumerate(list(row) + [False]):
    if v and start is None:
      start = i
    elif not v and start is not None:
      runs.append((start, i - start))
      start = None
  return runs


def test_span_mask_spans_fraction_and_determinism():
  rng = jax.random.PRNGKey(0)
  mask = np.asarray(w2v_bert.span_mask(rng, 512, 100, 0.065, 10))
  assert mask.shape == (512, 100) and mask.dtype == bool
  np.testing.assert_array_equal(mask, np.asarray(w2v_bert.span_mask(rng, 512, 100, 0.065, 10)))
  assert mask.any(axis=1).all()  # every clip has something to predict
  for row in mask[:64]:
    for start, length in _runs(row):
      # A run is a union of whole spans, so it is at least one span long; only a span that was
      # started before frame 0 could be cut, and none is.
      assert length >= 10 or start + length == 100, (start, length)
  expected = 1 - (1 - 0.065) ** 10  # away from the clip start, where fewer starts can cover
  assert abs(mask[:, 20:].mean() - expected) < 0.02, mask[:, 20:].mean()
  assert not np.array_equal(mask, np.asarray(
      w2v_bert.span_mask(jax.random.PRNGKey(1), 512, 100, 0.065, 10)))


def test_span_mask_rejects_bad_settings():
  with pytest.raises(ValueError, match='mask_prob'):
    w2v_bert.span_mask(jax.random.PRNGKey(0), 2, 10, 0.0, 3)
  with pytest.raises(ValueError, match='span'):
    w2v_bert.span_mask(jax.random.PRNGKey(0), 2, 10, 0.1, 11)


def test_negatives_are_other_masked_frames_of_the_same_clip():
  mask = np.zeros((3, 10), bool)
  mask[0, [1, 2, 3, 7]] = True
  mask[1, :] = True
  mask[2, [4]] = True
  idx, valid = jax.device_get(w2v_bert.sample_negatives(jax.random.PRNGKey(2), mask, 3))
  assert idx.shape == valid.shape == (3, 10, 3)
  for b in range(3):
    for t in range(10):
      chosen = idx[b, t][valid[b, t]]
      others = set(np.flatnonzero(mask[b])) - {t}
      assert len(chosen) == min(3, len(others))
      assert set(chosen) <= others and len(set(chosen)) == len(chosen)


# ------------------------------------------------------------------ losses vs numpy


def _np_contrastive(context, targets, mask, idx, valid, kappa):
  def cos(a, b):
    return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1), 1e-8) / np.maximum(
        np.linalg.norm(b, axis=-1), 1e-8)
  total, correct, count = 0.0, 0.0, 0.0
  for b in range(context.shape[0]):
    for t in range(context.shape[1]):
      if not mask[b, t]:
        continue
      logits = [cos(context[b, t], targets[b, t]) / kappa]
      for s, ok in zip(idx[b, t], valid[b, t]):
        if ok and not np.array_equal(targets[b, s], targets[b, t]):
          logits.append(cos(context[b, t], targets[b, s]) / kappa)
      logits = np.asarray(logits, np.float64)
      m = logits.max()
      total += np.log(np.sum(np.exp(logits - m))) + m - logits[0]
      correct += float(np.argmax(logits) == 0)
      count += 1
  return total, correct, count


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  context = rng.standard_normal((2, 7, 4)).astype(np.float32)
  targets = rng.standard_normal((2, 7, 4)).astype(np.float32)
  targets[0, 5] = targets[0, 2]  # a distractor with the target's own code is left out
  context[1, 3] = 3 * targets[1, 3]  # one frame that picks its target
  mask = rng.random((2, 7)) < 0.6
  mask[0, [2, 5]] = True
  mask[1, 3] = True
  idx, valid = jax.device_get(w2v_bert.sample_negatives(jax.random.PRNGKey(1), mask, 4))
  got = jax.device_get(w2v_bert.contrastive_loss(context, targets, mask, idx, valid, 0.1))
  want = _np_contrastive(context, targets, mask, idx, valid, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # By code ids: frames 2 and 5 of clip 0 share a code, every other frame has its own.
  ids = np.arange(14).reshape(2, 7)
  ids[0, 5] = ids[0, 2]
  got_ids = jax.device_get(w2v_bert.contrastive_loss(context, targets, mask, idx, valid, 0.1, ids))
  np.testing.assert_allclose(got_ids, want, rtol=1e-4)
  assert want[1] >= 1


def test_diversity_loss_matches_numpy():
  logits = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32) * 2
  loss, ppl = jax.device_get(w2v_bert.diversity_loss(logits))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True)).reshape(-1, 16).mean(0)
  want_ppl = np.exp(-np.sum(p * np.log(p + 1e-7)))
  np.testing.assert_allclose(ppl, want_ppl, rtol=1e-5)
  np.testing.assert_allclose(loss, (16 - want_ppl) / 16, rtol=1e-5)
  uniform_loss, uniform_ppl = jax.device_get(w2v_bert.diversity_loss(np.zeros((4, 16))))
  assert abs(uniform_ppl - 16) < 1e-3 and abs(uniform_loss) < 1e-4
  peaked = np.full((4, 16), -50.0)
  peaked[:, 3] = 50.0
  assert jax.device_get(w2v_bert.diversity_loss(peaked))[0] > 0.9


# ------------------------------------------------------------------ the network


@pytest.fixture(scope='module')
def net_and_params():
  net = _network()
  variables = net.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, SAMPLES)),
                       jnp.zeros((1, FRAMES), bool))
  return net, nn.meta.unbox(variables)['params']


@pytest.mark.parametrize('samples', [960, 960 * 7, 960 * 7 + 959, 24000])
def test_frame_rate_is_25_hz(net_and_params, samples):
  net, params = net_and_params
  assert net.frame_rate == 25.0 and net.hop_samples == 960
  for layer in (0, 1, 3):
    out = net.apply({'params': params}, jnp.zeros((2, samples)), layer, method='embed')
    assert out.shape == (2, samples // 960, 32), (layer, out.shape)


def test_embed_rejects_a_layer_beyond_the_model(net_and_params):
  net, params = net_and_params
  with pytest.raises(ValueError, match='layer=4'):
    net.apply({'params': params}, jnp.zeros((1, SAMPLES)), 4, method='embed')


def test_masked_prediction_targets_are_the_unmasked_quantizer_codes(net_and_params):
  net, params = net_and_params
  audio = jnp.asarray(_audio(2))
  mask_a = np.zeros((2, FRAMES), bool)
  mask_b = np.ones((2, FRAMES), bool)
  out_a = net.apply({'params': params}, audio, mask_a)
  out_b = net.apply({'params': params}, audio, mask_b)
  # The targets come from the features before masking: the mask does not change them.
  np.testing.assert_array_equal(out_a['target_ids'], out_b['target_ids'])
  np.testing.assert_array_equal(out_a['target_ids'],
                                np.argmax(np.asarray(out_a['quantizer_logits']), -1))
  assert not np.allclose(out_a['mlm_logits'], out_b['mlm_logits'])
  # The model's masked-prediction loss is the cross entropy at the masked frames only.
  model = _model()
  terms = model._losses({'model': params}, audio, jax.random.PRNGKey(5), None, True)  # pylint: disable=protected-access
  mask = w2v_bert.span_mask(jax.random.split(jax.random.PRNGKey(5), 4)[0], 2, FRAMES, 0.2, 3)
  out = net.apply({'params': params}, audio, mask)
  want = cross_entropy_with_integer_labels(out['mlm_logits'], out['target_ids'], mask)
  np.testing.assert_allclose(terms['mlm'][0], want[0], rtol=1e-5)
  np.testing.assert_allclose(terms['masked'], np.sum(np.asarray(mask)))


def test_paper_config_size():
  paper = w2v_bert.W2VBert()
  shapes = jax.eval_shape(lambda: paper.init({'params': jax.random.PRNGKey(0)},
                                             jnp.zeros((1, 9600)), jnp.zeros((1, 10), bool)))
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
  assert paper.num_layers == 24 and 5.5e8 < count < 6.5e8, count


# ------------------------------------------------------------------ the trainer


@pytest.fixture(scope='module')
def steps_on_meshes():
  model = _model()
  spec = {'audio': jax.ShapeDtypeStruct((8, SAMPLES), jnp.float32)}
  single = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                         spec)
  mesh = StepFunctions(model, Partitioner(mesh_shape=(2, 2, 2)), spec)
  return model, single, mesh


def test_one_step_on_a_2x2x2_mesh_equals_one_device(steps_on_meshes):
  _, single, mesh = steps_on_meshes
  batch = {'audio': _audio(8)}
  state_1, metrics_1 = one_step(single, batch)
  state_8, metrics_8 = one_step(mesh, batch)
  for key in ('loss', 'contrastive_loss', 'mlm_loss', 'diversity_loss', 'codebook_perplexity',
              'mask_fraction'):
    np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=2e-4, atol=1e-5, err_msg=key)
  assert metrics_1['gumbel_temperature'] == 2.0
  assert int(state_1.model_state['step']) == 1
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                         state_8.params, state_1.params)


def _patterned_audio(n, seed):
  """Clips repeating three random notes, one per 25 Hz frame: a masked frame is predictable
  from the frames three away, and frames differ, so the distractors can be told apart."""
  rng = np.random.default_rng(seed)
  freqs = rng.uniform(150, 1500, (n, 3))
  per_frame = freqs[:, np.arange(FRAMES) % 3]  # [n, frames]
  phase = np.cumsum(np.repeat(per_frame, 960, axis=1) / 24000.0, axis=1)
  return (0.4 * np.sin(2 * np.pi * phase)).astype(np.float32)


def test_the_losses_go_down_on_a_fixed_batch():
  """Adam on one batch of patterned clips (fresh masks, distractors and Gumbel noise each step):
  the deterministic eval losses fall and the masked-prediction accuracy rises, with the sharp
  codebook start of models/semantic/tiny.gin."""
  model = _model(network=_network(quantizer_logit_init_scale=25.0),
                 optimizer=OptimizerConfig(name='adam', learning_rate=3e-3, schedule='constant',
                                           grad_clip_norm=1.0),
                 temperature_decay=0.9, min_temperature=0.5)
  spec = {'audio': jax.ShapeDtypeStruct((8, SAMPLES), jnp.float32)}
  steps = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                        spec)
  state = steps.init(jax.random.PRNGKey(0))
  audio = _patterned_audio(8, seed=3)
  batch = steps.partitioner.host_local_batch_to_global({'audio': audio}, steps.batch_shardings)
  evaluate = jax.jit(model.eval_metrics)

  def metrics(state):
    m = jax.device_get(evaluate(state.params, state.model_state, {'audio': jnp.asarray(audio)}))
    return {k: float(a / b) for k, (a, b) in m.items()}

  before = metrics(state)
  for _ in range(100):
    state, _ = steps.train_step(state, batch)
  after = metrics(state)
  assert after['mlm_loss'] < 0.5 * before['mlm_loss'], (before, after)
  assert after['mlm_accuracy'] > 0.5 > before['mlm_accuracy'], (before, after)
  assert after['contrastive_loss'] < before['contrastive_loss'], (before, after)
