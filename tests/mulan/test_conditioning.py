"""MuLan conditioning tokens: the RVQ, the conditioner directory, and training MuLan from gin."""
from __future__ import annotations

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.mulan import conditioning
from musiclm_jax.mulan.audio import ResNetAudioTower
from musiclm_jax.mulan.model import MuLan
from musiclm_jax.mulan.text import BertEncoder


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


# ------------------------------------------------------------------ the RVQ


def test_hand_made_codebooks_round_trip_exactly():
  rng = np.random.default_rng(0)
  # Three levels at well separated scales: greedy encoding recovers any combination.
  codebooks = np.stack([rng.normal(size=(8, 4)) * s for s in (100.0, 1.0, 0.01)]).astype(
      np.float32)
  codes = rng.integers(0, 8, size=(50, 3)).astype(np.int32)
  x = np.asarray(conditioning.rvq_decode(codes, codebooks))
  np.testing.assert_allclose(x, codebooks[0][codes[:, 0]] + codebooks[1][codes[:, 1]]
                             + codebooks[2][codes[:, 2]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(conditioning.rvq_encode(x, codebooks)), codes)


def test_fitted_rvq_error_falls_with_levels_and_centroids_are_exact():
  rng = np.random.default_rng(1)
  points = rng.normal(size=(256, 8)).astype(np.float32)
  codebooks, errors = conditioning.fit_rvq(points, 4, 16, seed=0, num_iters=20)
  assert codebooks.shape == (4, 16, 8) and codebooks.dtype == np.float32
  assert all(b < a for a, b in zip(errors, errors[1:]))
  assert errors[0] < np.mean(np.sum(np.square(points - points.mean(0)), -1))
  # The measured error of encode/decode through l levels is the fit's.
  for level in range(1, 5):
    recon = np.asarray(conditioning.rvq_decode(
        conditioning.rvq_encode(points, codebooks[:level]), codebooks[:level]))
    np.testing.assert_allclose(np.mean(np.sum(np.square(points - recon), -1)), errors[level - 1],
                               rtol=1e-4)
  # A first-level codeword is its own reconstruction with one level.
  one = codebooks[:1]
  np.testing.assert_array_equal(np.asarray(conditioning.rvq_decode(
      conditioning.rvq_encode(one[0], one), one)), one[0])
  np.testing.assert_array_equal(np.asarray(conditioning.rvq_encode(one[0], one))[:, 0],
                                np.arange(16))
  # Deterministic per seed.
  again, _ = conditioning.fit_rvq(points, 4, 16, seed=0, num_iters=20)
  np.testing.assert_array_equal(codebooks, again)
  with pytest.raises(ValueError, match='codes per level'):
    conditioning.fit_rvq(points[:8], 2, 16)


# ------------------------------------------------------------------ the conditioner

WINDOW = 4800
HOP = 2400


def _tiny_mulan():
  return MuLan(audio_tower=ResNetAudioTower.tiny(front_end=LogMelFrontEnd(n_mels=16),
                                                 stage_widths=(8, 16), num_groups=2),
               text_tower=BertEncoder(hidden=16, layers=1, heads=2, mlp=32, max_positions=32,
                                      pooler=False),
               embed_dim=8)


def _conditioner(levels=3, codes=4):
  network = _tiny_mulan()
  params = network.init(jax.random.key(0), jnp.zeros((1, WINDOW)), jnp.zeros((1, 8), jnp.int32),
                        jnp.ones((1, 8), jnp.int32))['params']
  cond = conditioning.MuLanConditioner(network, params, np.zeros((levels, 1, 8)), WINDOW, HOP,
                                       text_length=16)
  audio = np.random.default_rng(0).uniform(-0.5, 0.5, size=(24, WINDOW)).astype(np.float32)
  cond.codebooks, _ = conditioning.fit_rvq(cond.embed_audio(audio), levels, codes, num_iters=10)
  return cond


def test_conditioner_tokens_save_and_load(tmp_path):
  cond = _conditioner()
  wav = np.random.default_rng(5).uniform(-0.5, 0.5, size=(3, 3 * WINDOW)).astype(np.float32)
  tokens = cond.audio_tokens(wav)
  assert tokens.shape == (3, 3) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 4
  np.testing.assert_array_equal(cond.audio_tokens(wav[1]), tokens[1])
  texts = ['a calm piano melody', 'fast drums and an electric guitar']
  text_tokens = cond.text_tokens(texts)
  assert text_tokens.shape == (2, 3) and text_tokens.dtype == np.int32
  assert text_tokens.min() >= 0 and text_tokens.max() < 4
  # Text and audio go through the same quantizer.
  np.testing.assert_array_equal(
      text_tokens, np.asarray(conditioning.rvq_encode(cond.embed_text(texts), cond.codebooks)))
  np.testing.assert_array_equal(
      tokens, np.asarray(conditioning.rvq_encode(cond.embed_audio(wav), cond.codebooks)))
  with pytest.raises(ValueError, match='empty caption'):
    cond.text_tokens([''])

  path = str(tmp_path / 'cond')
  conditioning.save_conditioner(path, cond, {'note': 'test'})
  record = conditioning.read_conditioner_record(path)
  assert record['num_levels'] == 3 and record['codebook_size'] == 4 and record['note'] == 'test'
  loaded = conditioning.load_conditioner(path)
  assert loaded.network == cond.network
  np.testing.assert_array_equal(loaded.codebooks, cond.codebooks)
  np.testing.assert_array_equal(conditioning.audio_tokens(path, wav), tokens)
  np.testing.assert_array_equal(conditioning.text_tokens(path, texts), text_tokens)
  with pytest.raises(FileExistsError):
    conditioning.save_conditioner(path, cond)
  other = _conditioner(levels=2)
  conditioning.save_conditioner(path, other, overwrite=True)
  assert conditioning.load_conditioner(path).num_levels == 2
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []
  with pytest.raises(FileNotFoundError, match='not a MuLan conditioner'):
    conditioning.load_conditioner(str(tmp_path))


# ------------------------------------------------------------------ gin: train, then fit


def _scalars(logdir, tag):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(logdir)):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
        for value in event.summary.value:
          if value.tag == tag:
            out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_corpus_dir):
  """16 steps of the tiny MuLan (models/mulan/tiny.gin, pretrained MiniLM) on the tiny corpus."""
  run_dir = tmp_path_factory.mktemp('mulan') / 'run'
  gin.clear_config(clear_constants=False)
  rc = main.main(['train', '--gin_file=runs/train_mulan.gin', '--gin_file=models/mulan/tiny.gin',
                  f"--gin.MODEL_DIR='{run_dir}'", "--gin.TRAIN_TASK='embedded_music_tiny_mulan'",
                  f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'", '--gin.TRAIN_STEPS=16',
                  '--gin.BATCH_SIZE=8', '--gin.CLIP_SAMPLES=4800', '--gin.TEXT_LENGTH=16',
                  '--gin.train.eval_every_steps=16', '--gin.train.eval_batches=1',
                  '--gin.train.progress_bar=False', '--gin.train.checkpoint_every_steps=16',
                  '--gin.train.log_every_steps=4', '--gin.OptimizerConfig.warmup_steps=0',
                  # Two of the 8 simulated devices: the negatives are still gathered across
                  # devices, and on a loaded 2-core machine 8 CPU "devices" can miss XLA's 40 s
                  # collective rendezvous timeout (seen: an abort in the all-gather).
                  '--gin.MESH_SHAPE=(2, 1, 1)'])
  gin.clear_config(clear_constants=False)
  assert rc == 0
  return run_dir


def test_mulan_trains_from_gin_and_its_loss_moves(trained):
  losses = _scalars(os.path.join(trained, 'train'), 'loss')
  assert sorted(losses) == [4, 8, 12, 16]
  assert losses[16] < losses[4] - 0.2, losses
  assert os.path.isdir(os.path.join(trained, 'checkpoints'))


def test_fit_conditioner_command_on_the_trained_run(trained, tmp_path, tiny_corpus_dir):
  path = str(tmp_path / 'cond')
  gin.clear_config(clear_constants=False)
  args = ['fit_conditioner', '--gin_file=examples/mulan_conditioner_tiny_cpu.gin',
          f"--gin.MULAN_DIR='{trained}'", f"--gin.CONDITIONER_DIR='{path}'",
          "--gin.TASK='embedded_music_tiny'", f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'",
          '--gin.NUM_EXAMPLES=12', '--gin.CLIP_SAMPLES=9600', '--gin.WINDOW_SAMPLES=4800',
          '--gin.HOP_SAMPLES=2400', '--gin.NUM_LEVELS=3', '--gin.CODEBOOK_SIZE=4',
          '--gin.NUM_ITERS=10', '--gin.TEXT_LENGTH=16']
  assert main.main(args) == 0
  record = conditioning.read_conditioner_record(path)
  assert record['num_embeddings'] == 12 and record['mulan_step'] == 16
  with open(os.path.join(path, 'conditioner.json')) as f:
    before = f.read()
  assert json.loads(before)['mulan']['embed_dim'] == 128
  cond = conditioning.load_conditioner(path)
  assert cond.text_tokens(['a calm piano melody']).shape == (1, 3)
  tokens = cond.audio_tokens(np.zeros(24000, np.float32))
  assert tokens.shape == (3,) and tokens.max() < 4
  # The evaluation command over the conditioner.
  from musiclm_jax.mulan import metrics  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'eval.json')
  assert metrics.main(['--conditioner_dir', path, '--task', 'embedded_music_tiny',
                       '--split', 'validation', '--clip_samples', '4800',
                       '--tfds_data_dir', tiny_corpus_dir, '--out', out]) == 0
  with open(out) as f:
    result = json.load(f)
  assert result['retrieval']['num_pairs'] >= 1
  assert set(result['zero_shot']) == {'instrument', 'tempo', 'drums'}
  gin.clear_config(clear_constants=False)
  with pytest.raises(FileExistsError, match='exists'):
    main.main(args)
  with open(os.path.join(path, 'conditioner.json')) as f:
    assert f.read() == before
  gin.clear_config(clear_constants=False)


@pytest.mark.parametrize('gin_files,widths,clip', [
    (['examples/mulan_tiny_cpu.gin'], (16, 32), 96000),
    (['runs/train_mulan.gin', 'models/mulan/paper.gin'], (256, 512, 1024, 2048), 240000)])
def test_gin_files_build_their_models(gin_files, widths, clip):
  from musiclm_jax.mulan.model import MuLanModel  # pylint: disable=g-import-not-at-top
  main.parse_gin(gin_files, ["MODEL_DIR='unused'"])
  model = MuLanModel()
  assert tuple(model.network.audio_tower.stage_widths) == widths
  assert model.network.embed_dim == 128 and model.pretrained_text_params is not None
  assert model.text_optimizer.learning_rate < model.optimizer.learning_rate
  assert gin.query_parameter('%CLIP_SAMPLES') == clip
  assert gin.query_parameter('%TEXT_LENGTH') == 64
  shapes = jax.eval_shape(model.init_variables, jax.random.key(0),
                          {'audio': jax.ShapeDtypeStruct((1, clip), jnp.float32),
                           'text_ids': jax.ShapeDtypeStruct((1, 64), jnp.int32)})
  assert jax.tree_util.tree_leaves(shapes['params']['text'])  # the text tower's own group
  assert shapes['params']['model']['audio_projection']['kernel'].value.shape == (widths[-1], 128)
