"""Melody tokens: the RVQ round trip, the conditioner directory, and the MuLan + melody prefix."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.melody import conditioning
from musiclm_jax.melody.encoder import MelodyEncoder

RATE = 2000


def _encoder():
  return MelodyEncoder(front_end=LogMelFrontEnd(sample_rate=RATE, n_fft=128, hop_length=40,
                                                n_mels=16, fmax=1000.0),
                       patch_time=4, embed_dim=16, num_layers=1, num_heads=2, head_dim=8,
                       mlp_dim=32, output_dim=24)


@pytest.fixture(scope='module')
def conditioner():
  """A randomly initialised encoder and an RVQ fitted on its embeddings of random clips."""
  encoder = _encoder()
  params = jax.jit(lambda: encoder.init(jax.random.PRNGKey(0),
                                        jnp.zeros((1, encoder.window_samples)))['params'])()
  cond = conditioning.MelodyConditioner(encoder, params, np.zeros((1, 1, 24), np.float32))
  rng = np.random.default_rng(0)
  # Clips with one of 6 "melodies" (tones), randomly detuned and scaled.
  t = np.arange(10 * RATE) / RATE
  freqs = 110.0 * 2 ** (rng.integers(0, 6, 24)[:, None] / 3 + rng.normal(0, 0.02, (24, 1)))
  wav = (rng.uniform(0.1, 0.5, (24, 1)) * np.sin(2 * np.pi * freqs * t)).astype(np.float32)
  points = cond.embed(wav).reshape(-1, 24)
  assert points.shape == (72, 24)  # 3 windows per 10 s clip
  cond.codebooks, errors = conditioning.fit_rvq(points, 4, 8, seed=0, num_iters=20)
  return cond, wav, points, errors


def test_tokens_round_trip(conditioner):
  cond, wav, points, errors = conditioner
  tokens = cond.tokens(wav)
  assert tokens.shape == (24, 3, 4) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 8
  assert cond.tokens(wav[0]).shape == (3, 4)
  # Decoding tokens and encoding the result gives the same tokens back ...
  recon = cond.dequantize(tokens)
  np.testing.assert_array_equal(cond.quantize(recon), tokens)
  # ... and the reconstruction error through all levels is the fit's, and falls with levels.
  emb = cond.embed(wav)
  np.testing.assert_allclose(np.mean(np.sum((emb - recon) ** 2, -1)), errors[-1], rtol=1e-3)
  assert all(b < a for a, b in zip(errors, errors[1:]))
  assert errors[-1] < 0.5 * np.mean(np.sum((points - points.mean(0)) ** 2, -1))


def test_conditioner_directory_round_trip(conditioner, tmp_path):
  cond, wav, _, _ = conditioner
  path = conditioning.save_melody_conditioner(str(tmp_path / 'cond'), cond, {'note': 'test'})
  record = json.load(open(os.path.join(path, 'melody_conditioner.json')))
  assert record['num_levels'] == 4 and record['codebook_size'] == 8
  assert record['window_samples'] == 4 * RATE and record['hop_samples'] == 3 * RATE
  loaded = conditioning.load_melody_conditioner(path)
  assert loaded.network == cond.network
  np.testing.assert_array_equal(loaded.tokens(wav), cond.tokens(wav))
  with pytest.raises(FileExistsError):
    conditioning.save_melody_conditioner(path, cond)
  with pytest.raises(FileNotFoundError, match='not a melody conditioner directory'):
    conditioning.load_melody_conditioner(str(tmp_path))


def test_prefix_layout():
  layout = conditioning.ConditioningLayout(mulan_levels=3, mulan_codebook_size=10,
                                           melody_levels=2, melody_codebook_size=5,
                                           melody_windows=2, offset=100)
  assert (layout.length, layout.vocab_size, layout.melody_offset) == (7, 40, 130)
  mulan = np.array([[0, 9, 4], [1, 2, 3]])
  melody = np.array([[[0, 4], [3, 1]], [[2, 2], [4, 0]]])
  prefix = layout.prefix(mulan, melody)
  # MuLan levels at 100 + 10 l + c, then melody window-major at 130 + 5 l + c.
  np.testing.assert_array_equal(prefix[0], [100, 119, 124, 130, 139, 133, 136])
  assert prefix.dtype == np.int32
  assert prefix.min() >= 100 and prefix.max() < 100 + layout.vocab_size
  back_mulan, back_melody = layout.split(prefix)
  np.testing.assert_array_equal(back_mulan, mulan)
  np.testing.assert_array_equal(back_melody, melody)
  np.testing.assert_array_equal(layout.prefix(mulan[1], melody[1]), prefix[1])
  with pytest.raises(ValueError, match=r'melody tokens must be in \[0, 5\)'):
    layout.prefix(mulan, melody + 1)
  with pytest.raises(ValueError, match='MuLan tokens have shape'):
    layout.prefix(mulan[:, :2], melody)
  with pytest.raises(ValueError, match='melody_windows must be positive'):
    conditioning.ConditioningLayout(12, 1024, 24, 512, melody_windows=0)
  paper = conditioning.ConditioningLayout(12, 1024, 24, 512, melody_windows=3)
  assert (paper.length, paper.vocab_size) == (84, 24576)
