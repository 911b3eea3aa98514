"""Tests of the SoundStream generator: causality, codes, chunking, sharding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax.codec import fourier
from musiclm_jax.codec import seanet
from musiclm_jax.codec import soundstream
from musiclm_jax.codec.soundstream import SoundStream
from musiclm_jax.nn.quantizer import STATE_COLLECTION
from musiclm_jax.train.partitioning import Partitioner

# Real strides (hop 480, receptive fields as in the full model), few channels.
TINY = dict(channels=4, channel_mults=(1, 2, 2, 4), embedding_dim=16,
            num_levels=4, codebook_size=32)
HOP = 480
# 30 whole frames and a partial one: every test audio has this shape, so the
# jitted whole-input functions compile once.
SAMPLES = 30 * HOP + 100
FRAMES = 31


def _audio(batch=2, samples=SAMPLES, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / 24000.0
  tone = 0.5 * np.sin(2 * np.pi * 220.0 * t)
  return (tone + 0.1 * rng.standard_normal((batch, samples))).astype(
      np.float32)


@pytest.fixture(scope='module')
def model():
  return SoundStream(**TINY)


@pytest.fixture(scope='module')
def variables(model):
  return jax.jit(lambda a: model.init({'params': jax.random.key(0)}, a,
                                      train=False))(_audio())


@pytest.fixture(scope='module')
def fns(model):
  """Jitted eval forward, encode and decode shared by the tests."""
  forward = jax.jit(lambda v, a: model.apply(v, a, train=False))
  encode = jax.jit(
      lambda v, a, n: model.apply(v, a, n_levels=n, method=SoundStream.encode),
      static_argnums=2)
  decode = jax.jit(lambda v, c: model.apply(v, c, method=SoundStream.decode))
  return forward, encode, decode


def test_rates_and_bitrates():
  full = SoundStream()
  assert full.hop_length == 480
  assert full.frame_rate == 50.0
  assert full.bitrate() == 6000.0
  assert [full.bitrate(n) for n in range(1, 13)] == [
      500.0 * n for n in range(1, 13)]
  assert SoundStream(**TINY).bitrate(4) == 4 * 5 * 50.0
  # One second gives 50 frames; a partial hop adds a frame.
  model = SoundStream(**TINY)
  variables = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 480)),
                         train=False))
  for samples, frames in [(24000, 50), (24001, 51), (479, 1)]:
    codes = jax.eval_shape(
        lambda v, a: model.apply(v, a, method=SoundStream.encode), variables,
        jnp.zeros((3, samples)))
    assert codes.shape == (3, frames, 4) and codes.dtype == jnp.int32
    out = jax.eval_shape(lambda v, a: model.apply(v, a, train=False),
                         variables, jnp.zeros((3, samples)))
    assert out['audio'].shape == (3, samples)
    assert out['codes'].shape == (3, frames, 4)


def test_receptive_fields_of_the_default_model():
  full = SoundStream()
  # 1 + 6 + 81 + 170 + 712 + 4656 + 960 samples (see seanet._encoder_layers).
  assert full.encoder_receptive_field == 6586
  assert full.encoder_context_frames == math.ceil((6586 - 480) / 480) == 13
  assert full.decoder_context_frames == 17
  # The helpers only depend on strides and kernels, not on widths.
  assert SoundStream(**TINY).encoder_receptive_field == 6586
  assert SoundStream(**TINY).decoder_context_frames == 17


def test_receptive_fields_are_exact():
  """Gradients reach exactly the inputs the receptive-field helpers name."""
  enc = seanet.SEANetEncoder(channels=2, channel_mults=(1, 1, 1, 1),
                             embedding_dim=2)
  dec = seanet.SEANetDecoder(channels=2, channel_mults=(1, 1, 1, 1),
                             embedding_dim=2)
  x = jnp.asarray(_audio(1, 20 * HOP))
  ve = enc.init(jax.random.key(0), x)
  g = jax.jit(jax.grad(lambda x: enc.apply(ve, x)[0, 19].sum()))(x)[0]
  hit = np.nonzero(np.asarray(g))[0]
  assert hit.max() == 20 * HOP - 1  # the end of frame 19's hop
  assert 20 * HOP - hit.min() == enc.receptive_field
  z = jax.random.normal(jax.random.key(1), (1, 20, 2))
  vd = dec.init(jax.random.key(0), z)
  g = jax.jit(jax.grad(lambda z: dec.apply(vd, z)[0, 19 * HOP]))(z)[0]
  hit = np.nonzero(np.abs(np.asarray(g)).sum(-1))[0]
  assert hit.max() == 19 and 19 - hit.min() == dec.context_frames


@pytest.mark.parametrize('length,stride,kernel,dilation',
                         [(12, 1, 7, 3), (12, 4, 8, 1), (13, 4, 8, 1),
                          (9, 3, 2, 1)])
def test_causal_conv1d(length, stride, kernel, dilation):
  conv = seanet.CausalConv1d(3, kernel, stride=stride, dilation=dilation)
  x = jax.random.normal(jax.random.key(0), (2, length, 2))
  v = conv.init(jax.random.key(1), x)
  y = conv.apply(v, x)
  assert y.shape == (2, -(-length // stride), 3)
  # Changing sample n only changes frames whose hop ends at or after n.
  n = length // 2
  y2 = conv.apply(v, x.at[:, n:].add(1.0))
  untouched = n // stride  # frames t whose hop ends before n: (t + 1) * s <= n
  np.testing.assert_array_equal(y[:, :untouched], y2[:, :untouched])
  assert not np.allclose(y[:, untouched:], y2[:, untouched:])


def test_causal_conv_transpose1d_matches_definition():
  conv = seanet.CausalConvTranspose1d(3, stride=4)
  x = jax.random.normal(jax.random.key(0), (2, 5, 2))
  v = conv.init(jax.random.key(1), x)
  y = np.asarray(conv.apply(v, x))
  assert y.shape == (2, 20, 3)
  kernel = np.asarray(nn.unbox(v)['params']['kernel'])  # [8, 2, 3]
  ref = np.zeros((2, 5 * 4 + 8, 3), np.float32)
  for t in range(5):
    for k in range(8):
      ref[:, t * 4 + k] += np.asarray(x[:, t]) @ kernel[k]
  np.testing.assert_allclose(y, ref[:, :20], rtol=1e-5, atol=1e-5)


def test_causality(variables, fns):
  forward, encode, _ = fns
  audio = _audio()
  cut = 10 * HOP
  late = audio.copy()
  late[:, cut:] += np.random.default_rng(1).standard_normal(
      (2, SAMPLES - cut)).astype(np.float32)
  a, b = forward(variables, audio), forward(variables, late)
  # The codec is causal with a latency of one hop: nothing before the
  # perturbation changes, neither codes of earlier hops nor audio.
  np.testing.assert_array_equal(a['codes'][:, :10], b['codes'][:, :10])
  np.testing.assert_allclose(a['audio'][:, :cut], b['audio'][:, :cut],
                             atol=1e-6)
  assert np.abs(a['audio'][:, cut:] - b['audio'][:, cut:]).max() > 1e-3
  assert np.any(a['codes'][:, 10:] != b['codes'][:, 10:])
  np.testing.assert_array_equal(encode(variables, audio, None), a['codes'])


def test_encode_decode_shapes_and_levels(model, variables, fns):
  _, encode, decode = fns
  audio = _audio()
  full = np.asarray(encode(variables, audio, None))
  assert full.shape == (2, FRAMES, 4) and full.dtype == np.int32
  assert full.min() >= 0 and full.max() < 32
  for n in (1, 2):
    codes = np.asarray(encode(variables, audio, n))
    assert codes.shape == (2, FRAMES, n)
    # Residual levels: fewer levels are a prefix of more.
    np.testing.assert_array_equal(codes, full[..., :n])
  coarse = decode(variables, full[..., :2])
  assert coarse.shape == (2, FRAMES * HOP) and coarse.dtype == jnp.float32
  # -1 marks an unused level and decodes like the shorter prefix.
  padded = np.concatenate([full[..., :2], -np.ones_like(full[..., :2])], -1)
  np.testing.assert_allclose(decode(variables, padded), coarse, atol=1e-5)
  fine = decode(variables, full)
  assert fine.shape == (2, FRAMES * HOP)
  assert not np.allclose(fine, coarse)
  with pytest.raises(ValueError, match='levels'):
    model.apply(variables, np.zeros((1, 3, 5), np.int32),
                method=SoundStream.decode)


def test_chunked_encode_equals_whole(model, variables, fns):
  _, encode, _ = fns
  audio = _audio(seed=3)
  whole = np.asarray(encode(variables, audio, None))
  # 5-frame chunks with 13 frames of context: 7 windows of one shape.
  chunked = np.asarray(soundstream.encode_chunked(
      model, variables, audio, chunk_seconds=0.1))
  assert chunked.shape == whole.shape and chunked.dtype == np.int32
  assert np.mean(chunked == whole) > 0.99
  two = np.asarray(soundstream.encode_chunked(
      model, variables, audio, chunk_seconds=0.1, n_levels=2))
  np.testing.assert_array_equal(two, chunked[..., :2])


def test_chunked_decode_equals_whole(model, variables, fns):
  _, encode, decode = fns
  codes = np.asarray(encode(variables, _audio(seed=4), None))
  whole = np.asarray(decode(variables, codes))
  chunked = np.asarray(soundstream.decode_chunked(model, variables, codes,
                                                  chunk_frames=5))
  assert chunked.shape == whole.shape == (2, FRAMES * HOP)
  np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)


def test_every_parameter_maps_to_divisible_mesh_axes():
  """The default model's variables all get specs that divide a 2x2x2 mesh."""
  partitioner = Partitioner(mesh_shape=(2, 2, 2))
  model = SoundStream()
  with partitioner.context():
    abstract = jax.eval_shape(
        lambda: model.init({'params': jax.random.key(0)},
                           jnp.zeros((2, 960)), train=False))
  specs = partitioner.mesh_specs_from_boxed(abstract)  # raises if unmapped
  assert set(specs) == {'params', STATE_COLLECTION}
  shapes = nn.unbox(abstract)
  flat_specs = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, P))
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  assert len(flat_specs) == len(flat_shapes)
  for spec, shape in zip(flat_specs, flat_shapes):
    for dim, axes in zip(shape.shape, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      assert dim % math.prod(partitioner.mesh.shape[a] for a in axes) == 0
  params = specs['params']
  assert params['encoder']['input_conv']['kernel'] == P(None, None, 'model')
  assert params['encoder']['block_0_residual_0']['dilated_conv'][
      'kernel'] == P(None, 'fsdp', 'model')
  assert params['decoder']['output_conv']['kernel'] == P(None, 'fsdp', None)
  assert params['decoder']['output_conv']['bias'] == P(None)


def test_runs_sharded_on_the_mesh(model):
  """Init and apply under a (data 2, fsdp 1, model 4) mesh, batch sharded."""
  partitioner = Partitioner(mesh_shape=(2, 1, 4))
  audio = _audio(batch=4, samples=4 * HOP)

  def init(a):
    return model.init({'params': jax.random.key(0)}, a, train=False)

  with partitioner.context():
    abstract = jax.eval_shape(init, audio)
  shardings = jax.tree_util.tree_map(
      partitioner.sharding, partitioner.mesh_specs_from_boxed(abstract),
      is_leaf=lambda x: isinstance(x, P))
  batch = partitioner.logical_sharding(('batch', 'length'))
  variables = partitioner.partition(
      lambda a: nn.unbox(init(a)), in_shardings=(batch,),
      out_shardings=shardings)(audio)
  kernel = variables['params']['encoder']['block_0_downsample']['kernel']
  assert kernel.sharding.spec == P(None, 'fsdp', 'model')
  forward = partitioner.partition(
      lambda v, a: model.apply(v, a, train=False)['audio'],
      in_shardings=(shardings, batch), out_shardings=batch)
  recon = forward(variables, jax.device_put(audio, batch))
  assert recon.shape == audio.shape
  assert recon.sharding.spec == P(('data', 'fsdp'), None)
  single = jax.jit(lambda v, a: model.apply(v, a, train=False)['audio'])(
      jax.device_get(variables), audio)
  np.testing.assert_allclose(recon, single, rtol=1e-4, atol=1e-5)


def test_training_reduces_reconstruction_loss(model):
  t = np.arange(8 * HOP) / 24000.0
  audio = np.stack([0.5 * np.sin(2 * np.pi * f * t) for f in (110.0, 330.0)
                    ]).astype(np.float32)
  init_vars = model.init({'params': jax.random.key(0)}, audio[:, :HOP],
                         train=False)
  params, state = init_vars['params'], init_vars[STATE_COLLECTION]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, state, opt_state, key):

    def loss_fn(params):
      out, mutated = model.apply(
          {'params': params, STATE_COLLECTION: state}, audio, train=True,
          rngs={'quantizer': key}, mutable=[STATE_COLLECTION])
      loss = jnp.mean(jnp.abs(out['audio'] - audio)) + jnp.mean(
          jnp.square(out['audio'] - audio)) + out['commitment_loss']
      return loss, (mutated[STATE_COLLECTION], out)

    (loss, (state, out)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss, out

  opt_state = tx.init(params)
  losses = []
  for i in range(30):
    params, state, opt_state, loss, out = step(params, state, opt_state,
                                               jax.random.key(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  # Better than silence: the codec learned something of the sines (the
  # straight-through gradient reaches the encoder through the quantizer).
  silence = np.mean(np.abs(audio)) + np.mean(np.square(audio))
  assert np.mean(losses[-3:]) < 0.9 * silence < 0.7 * losses[0], losses
  before = nn.unbox(init_vars)['params']['encoder']['input_conv']['kernel']
  after = nn.unbox(params)['encoder']['input_conv']['kernel']
  assert not np.allclose(before, after)
  # Quantizer dropout draws 1..4 levels per example once k-means has run.
  assert out['num_active_levels'].shape == (2,)
  assert bool(np.all(nn.unbox(state)['quantizer']['initialized']))


def test_snake_activation_is_causal_learns_alpha_and_leaves_elu_trees_alone(model, variables):
  snake = SoundStream(**TINY, activation='snake')
  audio = _audio()
  snake_vars = jax.jit(lambda a: snake.init({'params': jax.random.key(0)}, a,
                                            train=False))(audio)
  alphas = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                nn.unbox(snake_vars['params']))[0] if path[-1].key == 'alpha'}
  # One per channel of every activation: 4 per block on each side, the residual units' 2 each.
  assert 'decoder/output_act/alpha' in alphas and 'encoder/block_0_act/alpha' in alphas
  assert all(np.all(a == 1.0) for a in alphas.values())
  # ELU has no parameters: the ELU model's tree is what it was (shipped codecs still load).
  elu_paths = {'/'.join(str(getattr(k, 'key', k)) for k in path)
               for path, _ in jax.tree_util.tree_flatten_with_path(
                   nn.unbox(variables['params']))[0]}
  snake_paths = {'/'.join(str(getattr(k, 'key', k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(
                     nn.unbox(snake_vars['params']))[0]}
  assert snake_paths - set(alphas) == elu_paths
  assert not any('alpha' in p or '_act' in p for p in elu_paths)
  # snake(x) = x + sin^2(alpha x) / alpha, and still causal end to end.
  x = jnp.linspace(-3, 3, 7)[None, None, :]
  y = seanet.Snake().apply({'params': {'alpha': jnp.full((7,), 2.0)}}, x)
  np.testing.assert_allclose(y, x + jnp.sin(2.0 * x) ** 2 / 2.0, rtol=1e-6)
  forward = jax.jit(lambda v, a: snake.apply(v, a, train=False))
  cut = 10 * HOP
  late = audio.copy()
  late[:, cut:] += 1.0
  a, b = forward(snake_vars, audio), forward(snake_vars, late)
  np.testing.assert_allclose(a['audio'][:, :cut], b['audio'][:, :cut], atol=1e-6)
  with pytest.raises(ValueError, match="activation 'relu' is not one of"):
    SoundStream(**TINY, activation='relu').init({'params': jax.random.key(0)}, audio,
                                                 train=False)


def test_fourier_encoder_and_decoder_are_causal_chunk_exactly_and_shard():
  """The STFT encoder and Vocos-style decoder: exact receptive fields, a causal codec, exact
  chunking, mesh specs."""
  dec = fourier.FourierDecoder(hop_length=HOP, embedding_dim=2, dim=8, num_layers=2)
  assert dec.n_fft == 960 and dec.subframes == 2
  assert dec.context_frames == 6 * 3 + 2  # 3 convolutions of 7 taps, 3 overlapping STFT hops
  z = jax.random.normal(jax.random.key(1), (1, 30, 2))
  vd = dec.init(jax.random.key(0), z)
  g = jax.jit(jax.grad(lambda z: dec.apply(vd, z)[0, 29 * HOP:30 * HOP].sum()))(z)[0]
  hit = np.nonzero(np.abs(np.asarray(g)).sum(-1))[0]
  assert hit.max() == 29 and 29 - hit.min() == dec.context_frames
  # The inverse STFT by hand: one frame of known spectrum lands, windowed, at its own hop.
  frames = np.zeros((1, 3, 960), np.float32)
  frames[0, 1] = np.fft.irfft(np.arange(481) % 7, n=960) * fourier.hann_window(960)
  ola = np.asarray(fourier.overlap_add(jnp.asarray(frames), 240))
  np.testing.assert_allclose(ola[0, 240:], frames[0, 1, :480], atol=1e-7)
  assert np.all(ola[0, :240] == 0)

  enc = fourier.FourierEncoder(hop_length=HOP, embedding_dim=2, dim=8, num_layers=2)
  assert enc.receptive_field == HOP * (1 + 6 * 2) + 3 * 240 and enc.context_frames == 14
  x = jnp.asarray(_audio(1, 20 * HOP))
  ve = enc.init(jax.random.key(0), x)
  g = jax.jit(jax.grad(lambda x: enc.apply(ve, x)[0, 19].sum()))(x)[0]
  hit = np.nonzero(np.asarray(g))[0]
  # (The periodic Hann window's first tap is 0: the earliest sample counts, with weight 0.)
  assert hit.max() == 20 * HOP - 1 and 20 * HOP - hit.min() == enc.receptive_field - 1
  # The causal STFT by hand: frame f is the windowed samples [(f - 3) hop, (f + 1) hop).
  stft = np.asarray(fourier.causal_stft(x, 240))
  assert stft.shape == (1, 40, 481)
  np.testing.assert_allclose(stft[0, 5], np.fft.rfft(np.asarray(x)[0, 480:1440] *
                                                     fourier.hann_window(960)), atol=1e-4)

  model = SoundStream(**TINY, encoder_type='fourier', decoder_type='fourier', fourier_dim=8,
                      fourier_layers=1)
  assert model.decoder_context_frames == 6 * 2 + 2 and model.encoder_context_frames == 8
  audio = _audio()
  variables = jax.jit(lambda a: model.init({'params': jax.random.key(0)}, a,
                                           train=False))(audio)
  assert 'stft_head' in variables['params']['decoder']
  forward = jax.jit(lambda v, a: model.apply(v, a, train=False))
  cut = 10 * HOP
  late = audio.copy()
  late[:, cut:] += 1.0
  a, b = forward(variables, audio), forward(variables, late)
  assert a['audio'].shape == audio.shape
  np.testing.assert_allclose(a['audio'][:, :cut], b['audio'][:, :cut], atol=1e-6)
  assert np.abs(a['audio'][:, cut:] - b['audio'][:, cut:]).max() > 1e-4
  codes = np.asarray(a['codes'])
  whole = np.asarray(jax.jit(lambda v, c: model.apply(v, c, method=SoundStream.decode))(
      variables, codes))
  chunked = np.asarray(soundstream.decode_chunked(model, variables, codes, chunk_frames=7))
  np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)
  chunked = np.asarray(soundstream.encode_chunked(model, variables, audio, chunk_seconds=0.1))
  assert np.mean(chunked == codes) > 0.99
  # Every decoder parameter gets a spec that divides a 2x2x2 mesh.
  partitioner = Partitioner(mesh_shape=(2, 2, 2))
  with partitioner.context():
    abstract = jax.eval_shape(lambda: SoundStream(encoder_type='fourier',
                                                  decoder_type='fourier').init(
        {'params': jax.random.key(0)}, jnp.zeros((2, 960)), train=False))
  specs = partitioner.mesh_specs_from_boxed(abstract)
  for spec, shape in zip(jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                         jax.tree_util.tree_leaves(nn.unbox(abstract))):
    for dim, axes in zip(shape.shape, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      assert dim % math.prod(partitioner.mesh.shape[a] for a in axes) == 0
  with pytest.raises(ValueError, match='stft_hop=250 must divide'):
    fourier.FourierDecoder(hop_length=HOP, embedding_dim=2, stft_hop=250).init(
        jax.random.key(0), z)
  with pytest.raises(ValueError, match="encoder_type must be 'seanet' or 'fourier'"):
    SoundStream(**TINY, encoder_type='stft').init({'params': jax.random.key(0)}, audio,
                                                  train=False)
  with pytest.raises(ValueError, match="decoder_type must be 'seanet' or 'fourier'"):
    SoundStream(**TINY, decoder_type='vocos').init({'params': jax.random.key(0)}, audio,
                                                   train=False)
