"""The codec in the common trainer: GAN groups, one step on a mesh, a short run, load and encode."""
from __future__ import annotations

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.codec import model as codec_model
from musiclm_jax.codec.discriminators import CodecDiscriminators, STFTDiscriminator
from musiclm_jax.codec.soundstream import SoundStream
from musiclm_jax.train.optimizers import OptimizerConfig
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.mesh_steps import one_step

SAMPLES = 2400  # 5 frames
# A codec small enough to compile quickly, with the real strides, the STFT discriminator and the
# adversary on from the first step (so every loss term is exercised).
TINY = dict(channels=4, channel_mults=(1, 2, 2, 4), embedding_dim=16, num_levels=4,
            codebook_size=32)
TEST_BINDINGS = [
    'SoundStream.channels = 4', 'SoundStream.channel_mults = (1, 2, 2, 4)',
    'SoundStream.embedding_dim = 16', 'SoundStream.num_levels = 4',
    'SoundStream.codebook_size = 32', 'STFTDiscriminator.channels = 4',
    'CodecModel.eval_levels = (1, 4)', 'CodecModel.adversarial_start_step = 10',
    'CodecModel.adversarial_ramp_steps = 5', 'SoundStream.fourier_dim = 16',
    'SoundStream.fourier_layers = 1']


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


def _model(**overrides):
  kwargs = dict(
      generator=SoundStream(**TINY),
      discriminators=CodecDiscriminators(num_wave_scales=1, stft=STFTDiscriminator(channels=4)),
      # SGD keeps an update linear in the gradient, so the mesh comparison is a tight one.
      generator_optimizer=OptimizerConfig(name='sgd', learning_rate=0.1),
      discriminator_optimizer=OptimizerConfig(name='sgd', learning_rate=0.1),
      adversarial_start_step=0, adversarial_ramp_steps=0, eval_levels=(1, 4))
  kwargs.update(overrides)
  return codec_model.CodecModel(**kwargs)


def _batch(n=8):
  t = np.arange(SAMPLES) / 24000.0
  freqs = np.linspace(220, 880, n)[:, None]
  return {'audio': (0.5 * np.sin(2 * np.pi * freqs * t)).astype(np.float32)}


@pytest.fixture(scope='module')
def steps_on_meshes():
  model = _model()
  spec = {'audio': jax.ShapeDtypeStruct((8, SAMPLES), jnp.float32)}
  single = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                         spec)
  mesh = StepFunctions(model, Partitioner(mesh_shape=(2, 1, 4)), spec)
  return model, single, mesh


def test_one_step_on_a_2x1x4_mesh_equals_one_device(steps_on_meshes):
  _, single, mesh = steps_on_meshes
  batch = _batch()
  state_1, metrics_1 = one_step(single, batch)
  state_8, metrics_8 = one_step(mesh, batch)
  assert set(state_1.params) == {'generator', 'discriminator'}
  assert metrics_1['adversarial_ramp'] == 1.0 and metrics_1['discriminator_hinge'] > 0
  for key in ('loss', 'mel_loss', 'generator_adversarial', 'feature_matching',
              'discriminator_hinge', 'loss/generator', 'loss/discriminator'):
    np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=2e-4, atol=1e-5, err_msg=key)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
      state_8.params, state_1.params)
  # Both groups moved.
  init = jax.device_get(single.init(jax.random.PRNGKey(0)))
  for group in ('generator', 'discriminator'):
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(a - b))), state_1.params[group], init.params[group]))
    assert max(moved) > 0, group


def test_decoupled_gradients_equal_per_group_gradients(steps_on_meshes):
  """One backward pass of the summed losses gives each group exactly its own loss's gradient."""
  model, single, _ = steps_on_meshes
  state = jax.device_get(single.init(jax.random.PRNGKey(0)))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  rng = jax.random.PRNGKey(3)
  grads_once, _, _ = jax.jit(single._grads)(state.params, state.model_state, batch, rng)  # pylint: disable=protected-access
  try:
    model.losses_are_decoupled = False  # the generic path: one forward pass per group
    grads_each, _, _ = jax.jit(single._grads)(state.params, state.model_state, batch, rng)  # pylint: disable=protected-access
  finally:
    del model.losses_are_decoupled
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         grads_once, grads_each)


def test_warm_up_leaves_the_discriminator_alone(steps_on_meshes):
  model = _model(adversarial_start_step=100)
  steps = StepFunctions(model, steps_on_meshes[1].partitioner, steps_on_meshes[1].batch_spec)
  state, metrics = one_step(steps, _batch())
  init = jax.device_get(steps.init(jax.random.PRNGKey(0)))
  assert metrics['adversarial_ramp'] == 0.0 and metrics['loss/discriminator'] == 0.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params['discriminator'],
                         init.params['discriminator'])


def test_train_from_gin_lowers_the_loss_then_load_encode_decode(tmp_path, tiny_corpus_dir):
  model_dir = tmp_path / 'codec'
  rc = main.main(['train', '--gin_file=runs/train_codec.gin', '--gin_file=models/codec/tiny.gin',
                  f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_TASK='embedded_music_tiny'",
                  "--gin.EVAL_TASK='embedded_music_tiny'", f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'",
                  '--gin.TRAIN_STEPS=40', '--gin.BATCH_SIZE=8', f'--gin.CLIP_SAMPLES={SAMPLES}',
                  f'--gin.EVAL_CLIP_SAMPLES={4 * SAMPLES}', '--gin.train.eval_every_steps=40',
                  '--gin.train.eval_batches=1', '--gin.train.progress_bar=False',
                  '--gin.train.checkpoint_every_steps=40',
                  *[f'--gin.{b.replace(" ", "")}' for b in TEST_BINDINGS]])
  assert rc == 0
  assert os.listdir(model_dir / 'eval')  # eval scalars, audio and spectrogram summaries
  model, params, model_state, step = codec_model.load_codec(str(model_dir))
  assert step == 40 and model.generator.num_levels == 4
  audio = jnp.asarray(_batch(2)['audio'])
  codes = codec_model.encode(model, params, model_state, audio, n_levels=2)
  assert codes.shape == (2, SAMPLES // 480, 2) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < 32
  assert codec_model.decode(model, params, model_state, codes).shape == (2, SAMPLES)
  metrics = jax.device_get(model.eval_metrics(params, model_state, {'audio': audio}))
  # 32 codes = 5 bits per level at 50 Hz: 1 level is 0.25 kbps, 4 levels 1 kbps.
  assert {'mel_distance/0.25kbps', 'mel_distance/1kbps', 'si_snr/1kbps', 'code_usage'} <= set(
      metrics)


def test_short_run_lowers_the_reconstruction_loss(tmp_path, tiny_corpus_dir):
  from musiclm_jax.data.seqio_input import DatasetConfig  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train import trainer  # pylint: disable=g-import-not-at-top
  import tasks.audio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  data = DatasetConfig('embedded_music_tiny', {'audio': SAMPLES}, batch_size=8, seed=1,
                       feature_converter='audio', tfds_data_dir=tiny_corpus_dir)
  model = _model(discriminators=None,
                 generator_optimizer=OptimizerConfig(name='adam', learning_rate=3e-3))
  result = trainer.train(model=model, train_dataset=data,
                         model_dir=str(tmp_path / 'run'), train_steps=60, progress_bar=False,
                         log_every_steps=60)
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
