"""Melody encoder: window shapes and the 3 s hop, logical axes, and the paper size."""
from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.melody.encoder import MelodyEncoder, frame_windows, num_windows

RATE = 2000  # a low-rate front end keeps these compiles small; windows are in seconds
FRONT_END = LogMelFrontEnd(sample_rate=RATE, n_fft=128, hop_length=40, n_mels=16, fmax=1000.0)


def _encoder(**overrides):
  fields = dict(front_end=FRONT_END, patch_time=4, embed_dim=32, num_layers=1, num_heads=2,
                head_dim=16, mlp_dim=64)
  fields.update(overrides)
  return MelodyEncoder(**fields)


@pytest.mark.parametrize('seconds,want', [(10.0, 3), (4.0, 1), (3.0, 1), (9.9, 2), (11.0, 3),
                                          (13.0, 4), (28.0, 9)])
def test_number_of_windows(seconds, want):
  encoder = _encoder()
  assert encoder.num_windows(int(seconds * RATE)) == want
  assert num_windows(int(seconds * 24000), 96000, 72000) == want


def test_ten_seconds_give_three_192_d_windows_at_a_3_s_hop():
  encoder = _encoder()
  assert (encoder.window_samples, encoder.hop_samples) == (4 * RATE, 3 * RATE)
  rng = np.random.default_rng(0)
  audio = (0.3 * rng.standard_normal((2, 10 * RATE))).astype(np.float32)
  windows = np.asarray(frame_windows(audio, encoder.window_samples, encoder.hop_samples))
  assert windows.shape == (2, 3, 4 * RATE)
  for k in range(3):  # window k starts at 3k seconds
    np.testing.assert_array_equal(windows[:, k], audio[:, 3 * k * RATE:(3 * k + 4) * RATE])

  @jax.jit
  def run(audio):
    variables = encoder.init(jax.random.PRNGKey(0), audio[:, :encoder.window_samples])
    emb = encoder.apply(variables, audio, method=MelodyEncoder.embed_windows)
    alone = encoder.apply(variables, audio[:, 6 * RATE:10 * RATE])
    return emb, alone

  emb, alone = jax.device_get(run(audio))
  assert emb.shape == (2, 3, 192) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  # The third embedding is that of the window 6-10 s on its own; clips differ.
  np.testing.assert_allclose(emb[:, 2], alone, rtol=1e-4, atol=1e-5)
  assert np.abs(emb[0] - emb[1]).max() > 1e-3
  # A clip shorter than a window is one zero-padded window.
  short = jax.eval_shape(lambda a: encoder.init_with_output(
      jax.random.PRNGKey(0), a, method=MelodyEncoder.embed_windows)[0],
      jax.ShapeDtypeStruct((1, 2 * RATE), jnp.float32))
  assert short.shape == (1, 1, 192)


@pytest.mark.parametrize('patch_freq', [None, 8], ids=['frame_tokens', 'vit_patches'])
def test_parameters_are_logically_partitioned(patch_freq):
  encoder = _encoder(patch_freq=patch_freq)
  audio = jax.ShapeDtypeStruct((3, 4 * RATE), jnp.float32)
  variables = jax.eval_shape(lambda a: encoder.init(jax.random.PRNGKey(0), a), audio)
  leaves = jax.tree_util.tree_leaves(variables['params'],
                                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['patch_embedding']['kernel']) == ('conv_height', 'conv_width', 'embed')
  assert tuple(specs['layer_0']['self_attention']['query']['kernel']) == ('embed', 'heads', 'kv')
  assert tuple(specs['layer_0']['mlp']['wi']['kernel']) == ('embed', 'mlp')
  assert ('freq_embedding' in specs) == (patch_freq is not None)
  assert jax.eval_shape(encoder.apply, variables, audio).shape == (3, 192)


def test_paper_size_from_the_gin_file():
  gin.clear_config(clear_constants=False)
  try:
    main.parse_gin(['models/melody/paper.gin'], [])
    with gin.config_scope('MODEL'):
      encoder = MelodyEncoder()
  finally:
    gin.clear_config(clear_constants=False)
  assert (encoder.num_layers, encoder.num_heads, encoder.embed_dim, encoder.mlp_dim,
          encoder.output_dim) == (12, 6, 512, 1024, 192)
  audio = jax.ShapeDtypeStruct((1, encoder.window_samples), jnp.float32)
  shapes = jax.eval_shape(lambda a: encoder.init(jax.random.PRNGKey(0), a), audio)
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
  print(f'paper melody encoder: {count:,} parameters')
  # 12 x (attention 4 x 512 x 384 + MLP 2 x 512 x 1024 + norms) + patch embedding 4 x 128 x 512
  # + projection 512 x 192 + relative position biases.
  assert 22.3e6 < count < 22.5e6, count
  out = jax.eval_shape(lambda v, a: encoder.apply(v, a), shapes,
                       jax.ShapeDtypeStruct((2, 10 * 24000), jnp.float32))
  assert out.shape == (2, 192)


def test_pitch_front_end_puts_a_transposition_on_a_shift():
  from musiclm_jax.melody.encoder import PitchFrontEnd, shift_frequency  # pylint: disable=g-import-not-at-top
  fe = PitchFrontEnd(sample_rate=8000, n_fft=1024, hop_length=200, min_midi=48, max_midi=96)
  assert fe.num_bins == 97
  t = np.arange(8000) / 8000

  def tone(midi):
    f = 440.0 * 2 ** ((midi - 69) / 12)
    return sum(np.sin(2 * np.pi * k * f * t) / k for k in (1, 2, 3)).astype(np.float32)

  spec = np.asarray(jax.jit(fe)(np.stack([tone(69), tone(72)])))   # A4 and C5
  assert spec.shape == (2, 41, 97)
  peak = spec[:, 20].argmax(-1)
  np.testing.assert_array_equal(peak, [(69 - 48) * 2, (72 - 48) * 2])
  # Three semitones up is six bins up, harmonics included (away from the edges).
  shifted = np.asarray(shift_frequency(jnp.asarray(spec[:1]), jnp.array([6])))[0]
  peaks = lambda x: set(np.flatnonzero((x[1:-1] > x[:-2]) & (x[1:-1] > x[2:]) & (x[1:-1] > 0)))
  for frame in (10, 20, 30):  # the same harmonic peaks, the same overall shape
    assert peaks(shifted[frame]) == peaks(spec[1, frame]) and len(peaks(shifted[frame])) == 3
    assert np.corrcoef(shifted[frame, 6:], spec[1, frame, 6:])[0, 1] > 0.85
  assert np.all(shifted[:, :6] == spec[0].min())


def test_pitch_shift_augmentation_is_training_only():
  from musiclm_jax.melody.encoder import PitchFrontEnd  # pylint: disable=g-import-not-at-top
  encoder = _encoder(front_end=PitchFrontEnd(sample_rate=RATE, n_fft=128, hop_length=40,
                                             min_midi=48, max_midi=80), pitch_shift_bins=4)
  audio = np.random.default_rng(0).standard_normal((2, 4 * RATE)).astype(np.float32)

  @jax.jit
  def run(audio):
    variables = encoder.init(jax.random.PRNGKey(0), audio)
    rngs = lambda k: {'dropout': jax.random.PRNGKey(k), 'augment': jax.random.PRNGKey(k)}
    return (encoder.apply(variables, audio), encoder.apply(variables, audio),
            encoder.apply(variables, audio, deterministic=False, rngs=rngs(1)),
            encoder.apply(variables, audio, deterministic=False, rngs=rngs(2)))

  eval_1, eval_2, train_1, train_2 = jax.device_get(run(audio))
  np.testing.assert_array_equal(eval_1, eval_2)
  assert np.abs(train_1 - train_2).max() > 1e-4 and np.abs(train_1 - eval_1).max() > 1e-4
  with pytest.raises(ValueError, match='needs a PitchFrontEnd'):
    _encoder(pitch_shift_bins=2).init({'params': jax.random.PRNGKey(0),
                                       'augment': jax.random.PRNGKey(0)}, audio,
                                      deterministic=False)


def test_interval_features_make_the_encoder_transposition_invariant():
  from musiclm_jax.melody.encoder import PitchFrontEnd, interval_features, shift_frequency  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  spec = np.full((1, 30, 60), -11.0, np.float32)
  spec[0, :, 20:35] = rng.normal(size=(30, 15))                   # content away from the edges
  feats = np.asarray(interval_features(jnp.asarray(spec), (2, 5), 6))
  up = np.asarray(interval_features(shift_frequency(jnp.asarray(spec), jnp.array([7])), (2, 5), 6))
  assert feats.shape == (1, 30, 26)
  np.testing.assert_allclose(up, feats, rtol=1e-5, atol=1e-6)

  fe = PitchFrontEnd(sample_rate=8000, n_fft=512, hop_length=100, min_midi=40, max_midi=100)
  encoder = _encoder(front_end=fe, window_seconds=2.0, hop_seconds=1.5, patch_time=2,
                     features='intervals', interval_lags=(2, 5), max_interval_bins=8)
  t = np.arange(2000) / 8000

  def melody(pitches):
    notes = [sum(np.sin(2 * np.pi * k * 440 * 2 ** ((p - 69) / 12) * t) / k for k in (1, 2, 3))
             for p in pitches]
    return np.concatenate(notes).astype(np.float32)

  tune = [60, 64, 67, 64, 62, 65, 69, 72]
  audio = np.stack([melody(tune), melody([p + 5 for p in tune]), melody(tune[::-1])])

  @jax.jit
  def run(audio):
    return encoder.apply(encoder.init(jax.random.PRNGKey(0), audio), audio)

  emb = np.asarray(run(audio))
  # Even untrained: a transposed copy embeds (nearly: an STFT's pitch grid is not exactly
  # shift-equivariant) as the original, another melody does not.
  assert emb[0] @ emb[1] > 0.99
  assert emb[0] @ emb[2] < emb[0] @ emb[1] - 0.02
