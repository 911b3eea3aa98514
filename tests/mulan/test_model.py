"""MuLan: tower shapes, one step on a 2x2x2 mesh, the pretrained text tower, and learning."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.mulan.audio import ResNetAudioTower, SpectrogramTransformerTower
from musiclm_jax.mulan.model import MuLan, MuLanModel
from musiclm_jax.mulan.text import BertEncoder, WordPieceTokenizer, load_minilm_params
from musiclm_jax.train.optimizers import OptimizerConfig
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions

SR = 24000
SAMPLES = 4800  # 0.2 s: 21 log-mel frames
TEXT_LENGTH = 12
TINY_TEXT = dict(vocab_size=30522, hidden=32, layers=1, heads=2, mlp=64, max_positions=16,
                 pooler=False)
CAPTIONS = ['a low cello drone', 'bright flute melody', 'deep bass hum', 'shrill whistle',
            'warm organ chord', 'piercing violin note', 'soft tuba tone', 'high piccolo trill']


def _tiny_network(**overrides):
  kwargs = dict(audio_tower=ResNetAudioTower.tiny(front_end=LogMelFrontEnd(n_mels=32)),
                text_tower=BertEncoder(**TINY_TEXT), embed_dim=16)
  kwargs.update(overrides)
  return MuLan(**kwargs)


def _spec(batch=8):
  return {'audio': jax.ShapeDtypeStruct((batch, SAMPLES), jnp.float32),
          'text_ids': jax.ShapeDtypeStruct((batch, TEXT_LENGTH), jnp.int32),
          'text_mask': jax.ShapeDtypeStruct((batch, TEXT_LENGTH), jnp.int32)}


def _sinusoids(n=8):
  """Clip i: a sinusoid at 110 * 2^(i/2) Hz (distinct, half an octave apart)."""
  t = np.arange(SAMPLES) / SR
  freqs = 110.0 * 2.0 ** (np.arange(n)[:, None] / 2.0)
  return (0.5 * np.sin(2 * np.pi * freqs * t)).astype(np.float32)


@pytest.fixture(scope='module')
def batch():
  ids, mask = WordPieceTokenizer().encode(CAPTIONS, TEXT_LENGTH)
  return {'audio': _sinusoids(), 'text_ids': ids, 'text_mask': mask}


def _single(model, spec=None):
  return StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                       spec or _spec())


def _global(steps, batch):
  return steps.partitioner.host_local_batch_to_global(batch, steps.batch_shardings)


def _on_device(steps, state):
  """A host state placed as `steps` places its states.

  A first step from numpy arrays compiles another executable (no buffer donation) than the
  steps after it; placed like the step's outputs, the first compile serves every step.
  """
  return jax.device_put(state, steps.state_shardings)


def _with_optimizers(steps, state):
  """`state` (params grouped as `steps` expects) with fresh optimizer states, on device."""
  state = state.replace(opt_state={g: steps.txs[g].init(state.params[g]) for g in steps.groups})
  return _on_device(steps, jax.device_get(state))


# Compiling dominates these tests' time, so the initial state is built (compiled) once, for one
# device, and reused: the other step functions start from a host copy of it.
SGD = OptimizerConfig(name='sgd', learning_rate=0.1, schedule='constant', b1=0.0,
                      grad_clip_norm=None)  # no clipping: it clips each group on its own


@pytest.fixture(scope='module')
def one_device(batch):
  """(model, step functions, initial state on the host, state and metrics after one step)."""
  model = MuLanModel(_tiny_network(), optimizer=SGD)
  steps = _single(model)
  state0 = jax.device_get(steps.init(jax.random.PRNGKey(0)))
  state1, metrics1 = steps.train_step(_on_device(steps, state0), _global(steps, batch))
  return model, steps, state0, jax.device_get(state1), jax.device_get(metrics1)


# ---------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('tower', [
    ResNetAudioTower.tiny(),
    ResNetAudioTower.tiny(block='bottleneck', stage_widths=(16, 32), norm='layer'),
    SpectrogramTransformerTower.tiny(),
    SpectrogramTransformerTower.tiny(time_positions='learned', max_time_patches=8),
], ids=['resnet_basic', 'resnet_bottleneck_layernorm', 'transformer_relative',
        'transformer_learned'])
def test_tower_shapes(tower):
  audio = jax.ShapeDtypeStruct((3, SAMPLES), jnp.float32)
  variables = jax.eval_shape(lambda a: tower.init(jax.random.PRNGKey(0), a), audio)
  out = jax.eval_shape(tower.apply, variables, audio)
  assert out.shape == (3, tower.output_dim) and out.dtype == jnp.float32
  # Every parameter is logically partitioned; the 1-channel input axis is not sharded.
  leaves = jax.tree_util.tree_leaves(variables['params'],
                                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  specs = nn.get_partition_spec(variables)['params']
  if isinstance(tower, ResNetAudioTower):
    assert tuple(specs['stem_conv']['kernel']) == ('conv_height', 'conv_width', None, 'conv_out')
  else:
    assert tuple(specs['patch_embedding']['kernel']) == ('conv_height', 'conv_width', 'embed')
  # Any clip length works (up to the learned time table's length: 8 patches of 8 frames).
  longer = jax.ShapeDtypeStruct((1, 2 * SAMPLES), jnp.float32)
  assert jax.eval_shape(tower.apply, variables, longer).shape == (1, tower.output_dim)
  too_long = jax.ShapeDtypeStruct((1, 4 * SAMPLES), jnp.float32)
  if getattr(tower, 'time_positions', None) == 'learned':
    with pytest.raises(ValueError, match='max_time_patches'):
      jax.eval_shape(tower.apply, variables, too_long)
  else:
    assert jax.eval_shape(tower.apply, variables, too_long).shape == (1, tower.output_dim)


def test_paper_resnet50_sizes():
  tower = ResNetAudioTower()
  audio = jax.ShapeDtypeStruct((2, SR), jnp.float32)
  shapes = jax.eval_shape(lambda a: tower.init(jax.random.PRNGKey(0), a), audio)
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
  assert 23e6 < count < 24e6, count  # torchvision ResNet-50 without its classifier: 23.5M
  out = jax.eval_shape(lambda v, a: tower.apply(v, a), shapes, audio)
  assert out.shape == (2, 2048)


def test_transformer_tower_runs_and_ignores_the_rest_of_the_batch():
  tower = SpectrogramTransformerTower.tiny(front_end=LogMelFrontEnd(n_mels=32), num_layers=1)
  audio = _sinusoids()

  @jax.jit
  def run(rng, audio):
    variables = tower.init(rng, audio)
    return tower.apply(variables, audio), tower.apply(variables, audio[:2])

  out, alone = jax.device_get(run(jax.random.PRNGKey(0), audio))
  assert out.shape == (8, 32) and np.all(np.isfinite(out))
  assert np.std(out, axis=0).mean() > 1e-3  # clips differ
  # A clip's embedding does not depend on the rest of its batch (no batch statistics).
  np.testing.assert_allclose(alone, out[:2], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def test_one_step_on_a_2x2x2_mesh_equals_one_device(batch, one_device):
  """One SGD step of a two-group model ('model' + 'text') on a 2x2x2 mesh equals one step of
  the one-group model on one device: the batch (and its negatives) is global, and the text
  group's gradient is the shared loss's (one compile checks both)."""
  one_group, _, state0, state_1, metrics_1 = one_device
  two_groups = MuLanModel(_tiny_network(), optimizer=SGD, text_optimizer=SGD)
  assert set(two_groups.optimizers) == {'model', 'text'} and two_groups.losses_are_decoupled
  mesh = StepFunctions(two_groups, Partitioner(mesh_shape=(2, 2, 2)), _spec())
  params = dict(state0.params['model'])
  text = params.pop('text_tower')
  state = _with_optimizers(mesh, state0.replace(params={'model': params, 'text': text}))
  assert state.params['model']['audio_projection']['kernel'].sharding.spec == P('fsdp', 'model')
  state_8, metrics_8 = jax.device_get(mesh.train_step(state, _global(mesh, batch)))
  for key in ('loss', 'accuracy/audio_to_text', 'accuracy/text_to_audio', 'cosine/pairs',
              'logit_scale'):
    np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=2e-4, atol=1e-5,
                               err_msg=key)
  assert float(metrics_8['grad_norm/text']) > 0 and float(metrics_1['grad_norm/model']) > 0
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                         two_groups.network_params(state_8.params),
                         one_group.network_params(state_1.params))
  np.testing.assert_allclose(state_8.params['model']['log_temperature'],
                             state_1.params['model']['log_temperature'], rtol=1e-5)
  # The temperature is learned.
  assert state_1.params['model']['log_temperature'] != one_group.init_log_temperature


def test_pretrained_text_tower_loads():
  text_tower = BertEncoder(pooler=False)
  model = MuLanModel(_tiny_network(text_tower=text_tower), pretrained_text=True,
                     text_optimizer=OptimizerConfig(learning_rate=1e-5))
  state = _single(model).init(jax.random.PRNGKey(0))
  want = load_minilm_params(text_tower)
  got = jax.device_get(state.params['text'])
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  assert 'text_tower' not in state.params['model']


def test_fifty_adam_steps_learn_the_pairs(batch, one_device):
  """8 distinct sinusoids paired with 8 distinct captions: in-batch retrieval is learned."""
  _, _, state0, _, _ = one_device
  model = MuLanModel(_tiny_network(), optimizer=OptimizerConfig(
      name='adam', learning_rate=3e-3, schedule='constant', grad_clip_norm=1.0))
  steps = _single(model)
  state = _with_optimizers(steps, state0)
  global_batch = _global(steps, batch)
  evaluate = jax.jit(model.eval_metrics)

  def metrics(state):
    m = jax.device_get(evaluate(state.params, state.model_state, batch))
    return {k: float(a / b) for k, (a, b) in m.items()}

  before = metrics(state)
  assert before['recall@10/audio_to_text'] == 1.0  # 8 candidates
  for _ in range(50):
    state, _ = steps.train_step(state, global_batch)
  after = metrics(state)
  assert after['loss'] < 0.5 * before['loss'], (before, after)
  assert after['recall@1/audio_to_text'] > 0.5, (before, after)
  assert after['recall@1/text_to_audio'] > 0.5, (before, after)
