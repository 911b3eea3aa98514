"""The pipeline shipped in the package (musiclm_jax/pretrained/tiny, `make ship-tiny`).

What `make demo` loads on a fresh machine: its files match the manifest, it stays under the
shipping budget, and 2 s sampled from a caption are music-like: neither silent nor noise (the
spectral flatness, the geometric over the arithmetic mean of a frame's power spectrum, far below
white noise's, which is about 0.56 with a Hann window).
"""
import json
import os

import numpy as np
import pytest

from musiclm_jax.generate import demo
from musiclm_jax.data import integrity
from musiclm_jax.generate import ship
from musiclm_jax.generate.pipeline import Pipeline

SHIPPED = demo.DEFAULT_CHECKPOINT
CAPTION = demo.DEFAULT_CAPTIONS[0]


def spectral_flatness(audio: np.ndarray, n_fft: int = 1024, hop: int = 256) -> float:
  """Median over frames of exp(mean log power) / mean power (1: flat like noise, 0: a tone)."""
  frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
  power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-12
  return float(np.median(np.exp(np.mean(np.log(power), -1)) / np.mean(power, -1)))


def test_flatness_tells_a_tone_from_noise():
  t = np.arange(48000) / 24000
  rng = np.random.default_rng(0)
  assert spectral_flatness(rng.standard_normal(48000)) == pytest.approx(0.56, abs=0.02)
  assert spectral_flatness(0.3 * np.sin(2 * np.pi * 440 * t)) < 1e-3


@pytest.fixture(scope='module')
def shipped():
  assert os.path.isfile(os.path.join(SHIPPED, ship.MANIFEST)), (
      f'{SHIPPED}: no shipped pipeline (make train-tiny && make ship-tiny)')
  return Pipeline.load(SHIPPED)


def test_shipped_files_match_their_manifest_and_budget():
  assert integrity.manifest_problems(SHIPPED) == []
  with open(os.path.join(SHIPPED, ship.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['total_bytes'] < 60e6
  assert manifest['made_by']['steps'], 'the manifest records the recipe that made it'
  assert manifest['evaluation']['systems']['generated']


def test_shipped_pipeline_samples_two_seconds_of_music(shipped):
  result = shipped.generate_tokens(CAPTION, 2.0, seed=0)
  audio = np.asarray(result.audio[0], np.float64)
  assert audio.shape == (2 * shipped.sample_rate,)
  assert np.all(np.isfinite(audio))
  rms = float(np.sqrt(np.mean(audio ** 2)))
  assert rms > 1e-3, f'silent: rms {rms:.2e}'
  noise = np.random.default_rng(0).standard_normal(audio.shape) * rms
  flat, noise_flat = spectral_flatness(audio), spectral_flatness(noise)
  # A barely trained pipeline (4 steps a part, pipelines/tiny_smoke.gin) measures about 0.42
  # here: the bound sits well under it.
  assert flat < 0.25 * noise_flat, f'noise-like: flatness {flat:.3f} vs white noise {noise_flat:.3f}'
