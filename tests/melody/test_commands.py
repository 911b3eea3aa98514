"""The melody commands end to end on the tiny corpus: train from gin, fit the tokens, measure."""
from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.melody import conditioning, metrics

# A smaller encoder than models/melody/tiny.gin (one layer of width 32): these tests check the
# plumbing, not the model.
SMALL = ['--gin.MelodyEncoder.num_layers=1', '--gin.MelodyEncoder.embed_dim=32',
         '--gin.MelodyEncoder.head_dim=8', '--gin.MelodyEncoder.mlp_dim=64']


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_corpus_dir):
  """4 steps of examples/melody_tiny_cpu.gin on the tiny corpus (1 s crops)."""
  run_dir = tmp_path_factory.mktemp('melody') / 'run'
  gin.clear_config(clear_constants=False)
  rc = main.main(['train', '--gin_file=examples/melody_tiny_cpu.gin',
                  f"--gin.MODEL_DIR='{run_dir}'", "--gin.TRAIN_TASK='embedded_music_tiny_melody'",
                  f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'", '--gin.TRAIN_STEPS=4',
                  '--gin.BATCH_SIZE=2', '--gin.CLIP_SAMPLES=24000',
                  '--gin.train.eval_every_steps=4', '--gin.train.progress_bar=False',
                  '--gin.train.checkpoint_every_steps=4', '--gin.train.log_every_steps=2',
                  # Two simulated devices: on a loaded 2-core machine 8 can miss XLA's
                  # collective rendezvous timeout.
                  '--gin.MESH_SHAPE=(2, 1, 1)'] + SMALL)
  gin.clear_config(clear_constants=False)
  assert rc == 0
  return run_dir


def test_train_writes_checkpoints_and_eval_metrics(trained):
  assert os.path.isdir(os.path.join(trained, 'checkpoints', '4'))
  config = open(os.path.join(trained, 'config.gin')).read()
  assert 'MelodyModel' in config and "'embedded_music_tiny_melody'" in config


def test_fit_melody_conditioner_and_the_metrics_cli(trained, tmp_path, tiny_corpus_dir, capsys):
  path = str(tmp_path / 'cond')
  assert main.main(['fit_melody_conditioner', '--gin_file=runs/fit_melody_conditioner.gin',
                    f"--gin.MELODY_DIR='{trained}'", f"--gin.CONDITIONER_DIR='{path}'",
                    "--gin.TASK='embedded_music_tiny'", f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'",
                    '--gin.CLIP_SAMPLES=96000', '--gin.NUM_LEVELS=3', '--gin.CODEBOOK_SIZE=4',
                    '--gin.NUM_ITERS=10']) == 0
  record = conditioning.read_melody_conditioner_record(path)
  # 12 training clips of 4 s, one window each.
  assert record['num_embeddings'] == 12 and record['melody_step'] == 4
  assert record['embed_dim'] == 192 and record['window_samples'] == 96000
  cond = conditioning.load_melody_conditioner(path)
  tokens = cond.tokens(np.zeros((2, 240000), np.float32))
  assert tokens.shape == (2, 3, 3) and tokens.max() < 4
  # A second fit into the same directory is refused before anything is loaded.
  with pytest.raises(FileExistsError, match='exists'):
    conditioning.fit_melody_conditioner(str(trained), path)

  out = str(tmp_path / 'retrieval.json')
  capsys.readouterr()
  assert metrics.main(['--model_dir', str(trained), '--split', 'train',
                       '--tfds_name', 'embedded_music/tiny:1.1.0',
                       '--tfds_data_dir', tiny_corpus_dir, '--baselines', 'chroma_mean',
                       '--min_shared_seconds', '1.0', '--output_json', out]) == 0
  table = capsys.readouterr().out
  assert '| melody_embedding |' in table and '| chroma_mean |' in table and 'chance' in table
  results = json.load(open(out))
  assert results['clips'] == 12
  assert results['results']['melody_embedding']['all']['num_pairs'] == 12  # 6 melodies x 2
  assert metrics.main(['--conditioner_dir', path, '--split', 'train', '--baselines', '',
                       '--tfds_name', 'embedded_music/tiny:1.1.0',
                       '--tfds_data_dir', tiny_corpus_dir]) == 0
