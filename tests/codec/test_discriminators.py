"""Tests for the codec discriminators: shapes, sharding specs under the mesh rules, gradients."""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax.codec import discriminators as disc
from musiclm_jax.train import partitioning

SAMPLE_RATE = 24000
SAMPLES = SAMPLE_RATE // 2  # 0.5 s
BATCH = 2


def _tiny(use_stft=True, num_wave_scales=3):
  """Default geometry (STFT 1024 / 256, 4 downsamplings of 4), few channels: cheap compiles."""
  return disc.CodecDiscriminators(
      use_stft=use_stft, num_wave_scales=num_wave_scales,
      stft=disc.STFTDiscriminator(channels=4),
      wave=disc.WaveDiscriminator(channels=4, max_channels=16))


def _audio(seed=0):
  return 0.1 * np.random.default_rng(seed).standard_normal((BATCH, SAMPLES)).astype(np.float32)


@pytest.fixture(scope='module')
def partitioner():
  return partitioning.Partitioner(mesh_shape=(2, 1, 4))


@pytest.fixture(scope='module')
def run(partitioner):
  """Params and one jitted forward + backward pass under the (2, 1, 4) mesh, shared by tests."""
  model = _tiny()
  audio = jnp.asarray(_audio())
  with partitioner.context():
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), audio))

    def loss(params, x):
      outputs = model.apply({'params': params}, x)
      total = sum(jnp.mean(logits) + sum(jnp.mean(f) for f in feats)
                  for logits, feats in outputs)
      return total, outputs

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    x = jax.device_put(audio, partitioner.logical_sharding(('batch', None)))
    (_, outputs), grads = step(variables['params'], x)
  return model, variables, outputs, grads


def _expected_frames():
  """Logit frames per sub-discriminator for SAMPLES samples."""
  stft = 1 + SAMPLES // 256
  for _ in range(3):  # three (2, 2) blocks halve time, SAME padding rounds up
    stft = math.ceil(stft / 2)
  waves = [math.ceil((SAMPLES // 2 ** i) / 4 ** 4) for i in range(3)]
  return [stft] + waves


def test_output_shapes_and_finite(run):
  model, _, outputs, _ = run
  assert len(outputs) == model.num_discriminators == 1 + 3
  for (logits, feats), frames in zip(outputs, _expected_frames()):
    assert logits.shape == (BATCH, frames)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert feats and all(f.shape[0] == BATCH and np.all(np.isfinite(f)) for f in feats)
    # The batch axis is sharded over the data axes (fsdp has size 1 here, so only 'data').
    assert logits.sharding.spec[0] in ('data', ('data', 'fsdp'))
    assert feats[-1].sharding.spec[0] in ('data', ('data', 'fsdp'))
  stft_logits, stft_feats = outputs[0]
  # First conv, then one map per block; frequency halves per block from n_fft / 2 bins.
  assert [f.shape[2] for f in stft_feats] == [512, 256, 128, 64, 32, 16, 8]
  assert [f.shape[-1] for f in stft_feats] == [4, 4, 8, 16, 16, 32, 32]
  assert stft_logits.shape == (BATCH, 6)
  # MelGAN: k15 conv at full rate, four stride-4 convs, then the k5 conv.
  assert [f.shape[1] for f in outputs[1][1]] == [12000, 3000, 750, 188, 47, 47]


def test_gradients_finite_and_nonzero(run):
  _, variables, _, (param_grads, audio_grad) = run
  leaves = jax.tree_util.tree_leaves(param_grads)
  assert len(leaves) == len(jax.tree_util.tree_leaves(variables['params']))
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert audio_grad.shape == (BATCH, SAMPLES) and np.all(np.isfinite(audio_grad))
  assert np.any(audio_grad != 0)
  # Every sub-discriminator receives gradient.
  for name in ('stft_discriminator', 'wave_discriminators'):
    assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(param_grads[name]))


def test_every_param_has_a_mapped_spec(partitioner):
  model = _tiny()
  with partitioner.context():
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((BATCH, SAMPLES), jnp.float32))
    specs = partitioner.mesh_specs_from_boxed(abstract['params'])  # raises on unknown names
  boxed = jax.tree_util.tree_leaves(abstract['params'],
                                    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  assert all(len(b.names) == b.value.ndim for b in boxed)
  stft = specs['stft_discriminator']
  # Two input channels (real, imaginary) are not split; output channels go over 'model'.
  assert stft['conv_in']['kernel'] == P(None, None, None, 'model')
  assert stft['block1_down']['kernel'] == P(None, None, 'fsdp', 'model')
  assert stft['block1_down']['bias'] == P('model')
  # The one-channel logit convs are not split over 'model'.
  assert stft['conv_out']['kernel'] == P(None, None, 'fsdp', None)
  wave = specs['wave_discriminators']
  assert set(wave) == {'scale_0', 'scale_1', 'scale_2'}
  assert wave['scale_1']['down0']['kernel'] == P(None, 'fsdp', 'model')  # 4 -> 16, 1 group
  # Grouped (4 groups of 4 input channels): the small input axis is not split.
  assert wave['scale_1']['down2']['kernel'] == P(None, None, 'model')
  assert wave['scale_2']['conv_out']['bias'] == P(None)


def test_grouped_convs_and_channel_cap():
  model = disc.WaveDiscriminator(channels=16, max_channels=256)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 4096), jnp.float32)))['params']
  # MelGAN: 16 -> 64 -> 256 -> 256 -> 256 channels, groups of 4 input channels.
  assert shapes['conv_in']['kernel'].shape == (15, 1, 16)
  assert shapes['down0']['kernel'].shape == (41, 4, 64)
  assert shapes['down1']['kernel'].shape == (41, 4, 256)
  assert shapes['down3']['kernel'].shape == (41, 4, 256)
  assert shapes['conv_post']['kernel'].shape == (5, 256, 256)
  assert shapes['conv_out']['kernel'].shape == (3, 256, 1)


def test_either_kind_can_be_disabled():
  x = jax.ShapeDtypeStruct((BATCH, SAMPLES), jnp.float32)
  for use_stft, scales, count in ((False, 2, 2), (True, 0, 1)):
    model = _tiny(use_stft, scales)
    outputs = jax.eval_shape(
        lambda a, m=model: m.init_with_output(jax.random.key(0), a)[0], x)
    assert len(outputs) == model.num_discriminators == count
    assert (outputs[0][0].shape[1] == 6) == use_stft
  with pytest.raises(ValueError, match='use_stft is False'):
    jax.eval_shape(lambda a: _tiny(False, 0).init(jax.random.key(0), a), x)


def test_downsample_audio_is_melgan_avg_pool():
  x = np.random.default_rng(1).standard_normal((2, 11)).astype(np.float32)
  got = np.asarray(disc.downsample_audio(jnp.asarray(x)))
  # AvgPool1d(4, stride=2, padding=1, count_include_pad=False), by hand.
  padded = np.pad(x, ((0, 0), (1, 1)))
  mask = np.pad(np.ones_like(x), ((0, 0), (1, 1)))
  want = np.stack([padded[:, 2 * i:2 * i + 4].sum(-1) / mask[:, 2 * i:2 * i + 4].sum(-1)
                   for i in range(11 // 2)], axis=-1)
  assert got.shape == (2, 5)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gin_configures_default_submodules():
  with gin.unlock_config():
    gin.parse_config('WaveDiscriminator.channels = 8\n'
                     'WaveDiscriminator.num_downsamples = 2\n'
                     'STFTDiscriminator.channels = 2\n'
                     'CodecDiscriminators.num_wave_scales = 2')
  try:
    model = disc.CodecDiscriminators()
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jax.ShapeDtypeStruct((1, 4096), jnp.float32)))['params']
  finally:
    gin.clear_config()
  assert shapes['stft_discriminator']['conv_in']['kernel'].shape == (7, 7, 2, 2)
  waves = shapes['wave_discriminators']
  assert set(waves) == {'scale_0', 'scale_1'}
  assert waves['scale_0']['conv_in']['kernel'].shape == (15, 1, 8)
  assert set(waves['scale_1']) == {'conv_in', 'down0', 'down1', 'conv_post', 'conv_out'}
