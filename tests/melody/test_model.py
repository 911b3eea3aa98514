"""MelodyModel: one step on a 2x2x2 mesh equals one device; a short run learns melody over timbre."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.melody.encoder import MelodyEncoder
from musiclm_jax.melody.model import MelodyModel
from musiclm_jax.train.optimizers import OptimizerConfig
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions

RATE = 8000
WINDOW = RATE  # 1 s windows
FRONT_END = LogMelFrontEnd(sample_rate=RATE, n_fft=512, hop_length=80, n_mels=32, fmin=100.0,
                           fmax=3000.0)


def _encoder(**overrides):
  fields = dict(front_end=FRONT_END, window_seconds=1.0, hop_seconds=0.75, patch_time=4,
                embed_dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64,
                output_dim=16)
  fields.update(overrides)
  return MelodyEncoder(**fields)


def _spec(pairs):
  return {'audio': jax.ShapeDtypeStruct((pairs, WINDOW), jnp.float32),
          'positive_audio': jax.ShapeDtypeStruct((pairs, WINDOW), jnp.float32),
          'melody_label': jax.ShapeDtypeStruct((pairs, 1), jnp.int32)}


# Four melodies of five 0.2 s notes (MIDI pitches), each rendered in two timbres.
MELODIES = [(60, 64, 67, 72, 67), (72, 71, 69, 67, 65), (62, 62, 69, 69, 71), (67, 60, 67, 60, 64)]


def _render(pitches, timbre, transpose=0):
  t = np.arange(int(0.2 * RATE)) / RATE
  notes = []
  for p in pitches:
    f = 440.0 * 2.0 ** ((p + transpose - 69) / 12.0)
    if timbre == 'flute':      # nearly pure, soft attack
      x = np.sin(2 * np.pi * f * t) * np.minimum(1.0, t / 0.03)
    else:                      # 'reed': bright harmonics, sharp decay
      x = sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, 7)) * np.exp(-t / 0.08)
    notes.append(x)
  return (0.3 * np.concatenate(notes) / np.max(np.abs(np.concatenate(notes)))).astype(np.float32)


@pytest.fixture(scope='module')
def batch():
  """Pair i: melody i on the flute and on the reed (the reed a third higher)."""
  return {'audio': np.stack([_render(m, 'flute') for m in MELODIES]),
          'positive_audio': np.stack([_render(m, 'reed', transpose=4) for m in MELODIES]),
          'melody_label': np.arange(1, len(MELODIES) + 1, dtype=np.int32)[:, None]}


SGD = OptimizerConfig(name='sgd', learning_rate=0.1, schedule='constant', b1=0.0,
                      grad_clip_norm=None)


def test_one_step_on_a_2x2x2_mesh_equals_one_device(batch):
  model = MelodyModel(_encoder(), optimizer=SGD)
  one = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                      _spec(4))
  state0 = jax.device_get(one.init(jax.random.PRNGKey(0)))
  state1, metrics1 = jax.device_get(one.train_step(
      jax.device_put(state0, one.state_shardings),
      one.partitioner.host_local_batch_to_global(batch, one.batch_shardings)))
  mesh = StepFunctions(model, Partitioner(mesh_shape=(2, 2, 2)), _spec(4))
  state = jax.device_put(state0, mesh.state_shardings)
  assert state.params['model']['projection']['kernel'].sharding.spec == P('fsdp', 'model')
  state8, metrics8 = jax.device_get(mesh.train_step(
      state, mesh.partitioner.host_local_batch_to_global(batch, mesh.batch_shardings)))
  assert float(metrics1['loss']) > 0
  for key in ('loss', 'accuracy', 'active_fraction', 'distance/positive', 'distance/negative'):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-4, atol=1e-5, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                         state8.params, state1.params)


def test_a_short_run_puts_one_melody_in_two_timbres_closer_than_two_melodies_in_one(batch):
  model = MelodyModel(_encoder(), optimizer=OptimizerConfig(
      name='adam', learning_rate=3e-3, schedule='constant', grad_clip_norm=1.0), margin=0.5)
  steps = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                        _spec(4))
  state = steps.init(jax.random.PRNGKey(1))
  global_batch = steps.partitioner.host_local_batch_to_global(batch, steps.batch_shardings)
  embed = jax.jit(lambda p, a: model.embed(p, a))

  def distances(state):
    flute = np.asarray(embed(state.params, batch['audio']), np.float64)
    reed = np.asarray(embed(state.params, batch['positive_audio']), np.float64)
    same_melody = np.sum((flute - reed) ** 2, -1)                       # [4]
    same_timbre = [np.sum((e[:, None] - e[None]) ** 2, -1) for e in (flute, reed)]
    off = ~np.eye(len(MELODIES), dtype=bool)
    return same_melody, min(d[off].min() for d in same_timbre)

  before = distances(state)
  assert before[0].max() > before[1]  # at init timbre dominates: the test is not vacuous
  losses = []
  for _ in range(80):
    state, metrics = steps.train_step(state, global_batch)
    losses.append(float(metrics['loss']))
  same_melody, closest_other_melody = distances(state)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  # Every melody's two timbres are closer than any two melodies in one timbre.
  assert same_melody.max() < closest_other_melody, (before, same_melody, closest_other_melody)
