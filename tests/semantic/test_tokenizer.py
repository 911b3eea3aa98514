"""The semantic tokenizer end to end from gin: pre-train, fit k-means, save, load, tokenize."""
from __future__ import annotations

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.semantic import tokenizer as tokenizer_lib

FRAMES = 10
SAMPLES = 960 * FRAMES
# The tiny model file, shrunk further so that the test compiles quickly.
MODEL_BINDINGS = [
    'w2v_bert/LogMelFrontEnd.n_mels=16', 'W2VBert.conv_channels=4', 'W2VBert.embed_dim=32',
    'W2VBert.num_heads=2', 'W2VBert.head_dim=16', 'W2VBert.mlp_dim=64',
    'W2VBert.num_contrastive_layers=1', 'W2VBert.num_mlm_layers=2', 'W2VBert.codebook_size=16',
    'W2VBert.codebook_dim=8', 'W2VBert.projection_dim=8', 'W2VBertModel.num_negatives=5',
    'W2VBertModel.mask_span=3', 'W2VBertModel.temperature_decay=0.95']


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_corpus_dir):
  """A 30-step w2v-BERT run and a 3-layer-2 tokenizer with 8 clusters fitted on it."""
  root = tmp_path_factory.mktemp('semantic')
  run_dir, tok_dir = root / 'w2v_bert', root / 'tokenizer'
  rc = main.main(['train', '--gin_file=runs/train_w2v_bert.gin',
                  '--gin_file=models/semantic/tiny.gin', f"--gin.MODEL_DIR='{run_dir}'",
                  "--gin.TRAIN_TASK='embedded_music_tiny'", "--gin.EVAL_TASK='embedded_music_tiny'",
                  f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'", '--gin.TRAIN_STEPS=30',
                  '--gin.BATCH_SIZE=8', f'--gin.CLIP_SAMPLES={SAMPLES}',
                  '--gin.train.eval_every_steps=30', '--gin.train.eval_batches=1',
                  '--gin.train.progress_bar=False', '--gin.train.checkpoint_every_steps=30',
                  *[f'--gin.{b}' for b in MODEL_BINDINGS]])
  assert rc == 0
  gin.clear_config(clear_constants=False)
  args = ['fit_kmeans', '--gin_file=runs/fit_kmeans.gin',
          '--gin_file=models/semantic/tiny_tokenizer.gin', f"--gin.W2V_BERT_DIR='{run_dir}'",
          f"--gin.TOKENIZER_DIR='{tok_dir}'", "--gin.TASK='embedded_music_tiny'",
          f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'", f'--gin.CLIP_SAMPLES={SAMPLES}',
          '--gin.NUM_EXAMPLES=8', '--gin.NUM_CLUSTERS=8', '--gin.LAYER=2',
          '--gin.NUM_ITERS=10']
  assert main.main(args) == 0
  return run_dir, tok_dir, args


def test_fit_writes_a_tokenizer_record(trained):
  _, tok_dir, _ = trained
  record = json.load(open(os.path.join(tok_dir, 'tokenizer.json')))
  assert record['layer'] == 2 and record['num_clusters'] == 8
  assert record['source']['step'] == 30
  assert record['data']['frames'] == 8 * FRAMES
  assert record['kmeans']['inertia_per_frame'] > 0
  module = tokenizer_lib.tokenizer_module(str(tok_dir))
  assert module.encoder.embed_dim == 32 and module.encoder.front_end.n_mels == 16
  assert tokenizer_lib.encoder_config(module.encoder) == record['encoder']


def test_tokens_are_the_nearest_centroids_at_25_hz(trained):
  run_dir, tok_dir, _ = trained
  tok = tokenizer_lib.load_semantic_tokenizer(str(tok_dir), input_samples=SAMPLES, batch_size=4)
  rng = np.random.default_rng(0)
  t = np.arange(SAMPLES) / 24000.0
  audio = (0.3 * np.sin(2 * np.pi * rng.uniform(100, 900, (5, 1)) * t)).astype(np.float32)
  tokens = tok(audio)
  assert tokens.shape == (5, FRAMES) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 8
  assert len(np.unique(tokens)) > 1
  np.testing.assert_array_equal(tokenizer_lib.tokenize(str(tok_dir), audio[0]), tokens[0])
  # Against the definition: embeddings of the trained encoder's layer 2, nearest centroid.
  model, params, _, _ = tokenizer_lib.load_w2v_bert(str(run_dir))
  emb = np.asarray(model.network.apply({'params': jax.device_get(params['model'])},
                                       jnp.asarray(audio), 2, method='embed'))
  centroids = tok.variables()['params']['centroids']
  dist = np.sum((emb[:, :, None, :] - centroids[None, None]) ** 2, axis=-1)
  np.testing.assert_array_equal(tokens, np.argmin(dist, axis=-1))
  # Only the layers the tokenizer runs are stored: layer 2 is the first masked-prediction layer.
  encoder = tok.variables()['params']['encoder']
  assert set(encoder['mlm']) == {'layer_0', 'relpos_bias'}
  assert 'mlm_head' not in encoder and 'quantizer' not in encoder
  assert tok.provenance()['output'] == {'shape': [FRAMES], 'dtype': 'int32'}


def test_an_existing_tokenizer_is_not_overwritten(trained):
  _, tok_dir, args = trained
  before = open(os.path.join(tok_dir, 'tokenizer.json')).read()
  gin.clear_config(clear_constants=False)
  with pytest.raises(FileExistsError, match='exists'):
    main.main(args)
  assert open(os.path.join(tok_dir, 'tokenizer.json')).read() == before


def test_a_folder_that_is_not_a_tokenizer_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tokenizer_lib.load_semantic_tokenizer(str(tmp_path))


def test_a_seqio_task_carries_semantic_tokens(trained, tiny_corpus_dir):
  """The fitted tokenizer plugs into tasks.audio.register_tokenized_task like BEST-RQ's."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tasks import audio as audio_tasks  # pylint: disable=g-import-not-at-top
  _, tok_dir, _ = trained
  tok = tokenizer_lib.load_semantic_tokenizer(str(tok_dir), input_samples=SAMPLES)
  task = audio_tasks.register_tokenized_task(
      'test_embedded_music_tiny_semantic', 'embedded_music/tiny:1.1.0', SAMPLES / 24000, tok,
      splits=('validation',), tfds_data_dir=str(tiny_corpus_dir))
  assert task.output_features['semantic_tokens'].vocabulary.vocab_size == 8
  seqio.set_tfds_data_dir_override(str(tiny_corpus_dir))
  try:
    examples = list(tfds.as_numpy(task.get_dataset(None, split='validation', shuffle=False)))
  finally:
    seqio.set_tfds_data_dir_override(None)
  assert examples
  for ex in examples:
    assert ex['semantic_tokens'].shape == (FRAMES,)
    assert 0 <= ex['semantic_tokens'].min() and ex['semantic_tokens'].max() < 8
