"""MuLan's from-scratch text option: the SentencePiece caption vocabulary, its data and model."""
from __future__ import annotations

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from musiclm_jax import main
from musiclm_jax.data import seqio_input
from musiclm_jax.mulan import conditioning
from musiclm_jax.mulan import data as mulan_data
from musiclm_jax.mulan import vocabulary
from musiclm_jax.mulan.text import WordPieceTokenizer
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions

L = 16
SR = 24000
# Captions worded as the embedded corpus words them (its generator's templates and attributes).
CAPTIONS = [
    'This is an Irish dance tune performed by a sitar with an electric bass playing a simple '
    'bass line. The tempo is medium and the music is in F major.',
    'A wistful Irish dance tune in a minor key and 2/2 time, from a person whistling at a '
    'medium pace. There are no drums.',
    'A lone french horn performs a traditional dance tune in D minor at a fast tempo.',
    'The recording features a folk dance tune played on an oboe. The piece is in G# minor with '
    'a 6/8 meter and a brisk tempo of about 157 BPM.',
    'A calm piano melody with soft dynamics.',
    'irish folk, 6/8 time signature, warm, sitar, instrumental, electric bass, no drums',
    'chorale, humming, vocal, joyful, D major, fast tempo',
    'A driving dance tune played by a vibraphone with a contrabass playing a simple bass line.',
]


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


@pytest.fixture(scope='module')
def tokenizer():
  return vocabulary.SentencePieceTokenizer()


def _small_texts():
  """A few dozen captions: enough for a 320-id vocabulary, trained in a fraction of a second."""
  instruments = ['piano', 'flute', 'sitar', 'oboe', 'violin', 'french horn', 'accordion']
  moods = ['calm', 'joyful', 'wistful', 'restless', 'warm']
  texts = []
  for i, instrument in enumerate(instruments):
    for j, mood in enumerate(moods):
      texts.append(f'A {mood} folk tune played by a {instrument} at {60 + 7 * i + j} BPM.')
      texts.append(f'{instrument}, {mood}, folk, no drums')
  return texts


# ---------------------------------------------------------------------------
# The vocabulary
# ---------------------------------------------------------------------------


def test_packaged_vocabulary_is_a_seqio_vocabulary_that_round_trips(tokenizer):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  vocab = vocabulary.caption_vocabulary()
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert vocab.vocab_size == vocabulary.DEFAULT_VOCAB_SIZE == 1024
  assert (vocab.tokenizer.pad_id(), vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.sentencepiece_model_file == vocabulary.packaged_vocabulary_path()
  assert os.path.getsize(vocab.sentencepiece_model_file) < 400_000
  # Made with this module's settings.
  with open(vocab.sentencepiece_model_file, 'rb') as f:
    proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  spec = proto.trainer_spec
  assert (spec.model_type, spec.vocab_size, spec.byte_fallback, spec.split_digits) == (
      sentencepiece_model_pb2.TrainerSpec.BPE, 1024, True, True)
  assert proto.normalizer_spec.name == vocabulary.DEFAULT_NORMALIZATION
  for caption in CAPTIONS:
    ids = vocab.encode(caption)
    assert vocab.unk_id not in ids and max(ids) < vocab.vocab_size
    assert vocab.decode(ids) == caption.lower()  # case folded, otherwise exact
    np.testing.assert_array_equal(tokenizer.encode([caption], 64)[0][0, :len(ids) + 1],
                                  ids + [vocab.eos_id])
  # The corpus's words are whole pieces.
  assert [vocab.tokenizer.id_to_piece(i) for i in vocab.encode('A calm piano melody')] == [
      '▁a', '▁calm', '▁piano', '▁melody']


def test_training_is_deterministic_and_writes_atomically(tmp_path):
  texts = _small_texts()
  a = vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'a.model'), 320)
  b = vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'b.model'), 320)
  assert isinstance(a, seqio.SentencePieceVocabulary) and a.vocab_size == 320
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model').read_bytes()
  pieces = lambda v: [v.tokenizer.id_to_piece(i) for i in range(v.vocab_size)]
  assert pieces(a) == pieces(b)
  assert a.encode('a calm piano folk tune') == b.encode('a calm piano folk tune')
  assert a.decode(a.encode('Über café 🎹')) == 'über café 🎹'  # byte fallback: no <unk>

  before = (tmp_path / 'a.model').read_bytes()
  with pytest.raises(FileExistsError, match='a.model exists'):
    vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'a.model'), 300)
  assert (tmp_path / 'a.model').read_bytes() == before
  replaced = vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'a.model'), 300,
                                                 overwrite=True)
  assert replaced.vocab_size == 300  # seqio's per-path cache does not serve the old model
  assert sorted(os.listdir(tmp_path)) == ['a.model', 'b.model']  # no temporary file left

  with pytest.raises(ValueError, match='vocab_size=5000'):
    vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'c.model'), 5000)
  with pytest.raises(ValueError, match='no non-blank text'):
    vocabulary.train_caption_vocabulary(['', '  '], str(tmp_path / 'c.model'), 300)
  with pytest.raises(TypeError, match='single str'):
    vocabulary.train_caption_vocabulary('a caption', str(tmp_path / 'c.model'), 300)
  assert not (tmp_path / 'c.model').exists()


def test_the_packaged_vocabulary_is_what_the_command_makes(tmp_path):
  """Re-made from the built default corpus's train split, it is the shipped file byte for byte."""
  try:
    texts = vocabulary.caption_texts('embedded_music')
  except FileNotFoundError:
    pytest.skip('embedded_music/default is not built in the TFDS data directory')
  vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'remade.model'),
                                      vocabulary.DEFAULT_VOCAB_SIZE)
  with open(vocabulary.packaged_vocabulary_path(), 'rb') as f:
    assert (tmp_path / 'remade.model').read_bytes() == f.read()


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


def test_sentencepiece_tokenizer_non_ascii_empty_and_long_captions(tokenizer):
  non_ascii = ['Café Beyoncé — 🎹 über', '静かなピアノの旋律', 'Ünïcödé ßong']
  ids, mask = tokenizer.encode(non_ascii, 64)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 64)
  assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
  assert not np.any(ids == tokenizer.unk_id)
  assert tokenizer.decode(ids) == [t.lower() for t in non_ascii]
  for row, m in zip(ids, mask):
    n = int(m.sum())
    assert np.all(m[:n] == 1) and np.all(m[n:] == 0)  # real tokens, then padding
    assert row[n - 1] == tokenizer.eos_id and np.all(row[n:] == tokenizer.pad_id)

  for empty in ['', '   ', '\x00\x01', '\u200b\t']:
    with pytest.raises(ValueError, match='empty caption'):
      tokenizer.encode(['a fine caption', empty], L)

  long = ' '.join(['a calm piano melody with a soft flute'] * 40)
  full, _ = tokenizer.encode([long], 512)
  ids, mask = tokenizer.encode([long, 'short'], L)
  assert np.all(mask[0] == 1) and ids[0, -1] == tokenizer.eos_id
  np.testing.assert_array_equal(ids[0, :L - 1], full[0, :L - 1])  # the first L - 1 pieces
  assert mask[1].sum() < L

  with pytest.raises(ValueError, match='at least 2'):
    tokenizer.encode(['x'], 1)
  with pytest.raises(TypeError, match='single str'):
    tokenizer.encode('a calm piano melody', L)
  with pytest.raises(TypeError, match='SentencePieceVocabulary'):
    vocabulary.SentencePieceTokenizer(seqio.PassThroughVocabulary(8))


def _examples(captions):
  return tf.data.Dataset.from_generator(
      lambda: ({'caption': c, 'aspects': np.zeros([0], bytes), 'id': f'ex{i}'}
               for i, c in enumerate(captions)),
      output_signature={'caption': tf.TensorSpec([], tf.string),
                        'aspects': tf.TensorSpec([None], tf.string),
                        'id': tf.TensorSpec([], tf.string)})


def test_tokenize_text_with_the_sentencepiece_vocabulary(tokenizer):
  mulan_data.reset_skipped_examples()
  long = ' '.join(['a calm piano melody'] * 20)
  captions = ['A calm piano melody', '', 'Café über 🎹', '   ', long, '\x00\x01']
  with seqio.utils.map_seed_manager(0):
    ds = mulan_data.caption_or_aspects_to_text(_examples(captions), aspect_prob=0.0)  # pylint: disable=unexpected-keyword-arg
  ds = mulan_data.tokenize_text(ds, {'text_ids': L, 'text_mask': L},
                                vocabulary=vocabulary.caption_vocabulary())
  out = list(ds.as_numpy_iterator())
  assert [ex['id'] for ex in out] == [b'ex0', b'ex2', b'ex4']
  assert mulan_data.skipped_examples() == {'empty_caption': 3}
  for ex in out:
    assert ex['text_ids'].shape == (L,) and ex['text_ids'].dtype == np.int32
    ids, mask = tokenizer.encode([ex['text'].decode()], L)
    np.testing.assert_array_equal(ex['text_ids'], ids[0])
    np.testing.assert_array_equal(ex['text_mask'], mask[0])
  assert out[2]['text_mask'].sum() == L and out[2]['text_ids'][-1] == tokenizer.eos_id

  with pytest.raises(ValueError, match='not both'):
    mulan_data.tokenize_text(_examples(['x']), tokenizer_json='tokenizer.json',
                             vocabulary=vocabulary.caption_vocabulary())
  with pytest.raises(TypeError, match='SentencePieceVocabulary'):
    mulan_data.tokenize_text(_examples(['x']), vocabulary=seqio.PassThroughVocabulary(8))


def test_sp_task_batches_and_caption_texts(tiny_corpus_dir, tokenizer, tmp_path):
  import tasks.audio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  task = seqio.get_mixture_or_task('embedded_music_tiny_mulan_sp')
  assert task.output_features['text_ids'].vocabulary == vocabulary.caption_vocabulary()
  assert not isinstance(seqio.get_mixture_or_task('embedded_music_tiny_mulan')
                        .output_features['text_ids'].vocabulary, seqio.SentencePieceVocabulary)
  config = seqio_input.DatasetConfig(
      'embedded_music_tiny_mulan_sp', {'audio': 4800, 'text_ids': L, 'text_mask': L},
      batch_size=8, tfds_data_dir=tiny_corpus_dir, feature_converter='audio', seed=1)
  batch = next(seqio_input.numpy_batches(seqio_input.get_host_dataset(config)))
  assert sorted(batch) == ['audio', 'text_ids', 'text_mask']
  ids, mask = batch['text_ids'], batch['text_mask']
  assert ids.shape == mask.shape == (8, L) and ids.dtype == mask.dtype == np.int32
  assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
  lengths = mask.sum(-1)
  assert np.all(lengths >= 2)
  np.testing.assert_array_equal(mask, (np.arange(L)[None] < lengths[:, None]).astype(np.int32))
  np.testing.assert_array_equal(ids[np.arange(8), lengths - 1], tokenizer.eos_id)
  assert np.all(ids[mask == 0] == 0) and np.all(ids[mask == 1] != 0)
  assert not np.any(ids == tokenizer.unk_id)
  assert all(text and text == text.lower() for text in tokenizer.decode(ids))

  # The texts a vocabulary is fitted on: the train split's captions and joined aspect lists.
  texts = vocabulary.caption_texts('embedded_music_tiny', tfds_data_dir=tiny_corpus_dir)
  assert len(texts) == 24 and texts[0].endswith('.') and ', ' in texts[1]
  assert vocabulary.caption_texts('embedded_music_tiny', tfds_data_dir=tiny_corpus_dir,
                                  include_aspects=False) == texts[::2]
  for split in ('test', 'validation', 'train+test'):
    with pytest.raises(ValueError, match='training split only'):
      vocabulary.caption_texts('embedded_music_tiny', split, tfds_data_dir=tiny_corpus_dir)

  # The command: trains the tiny corpus's vocabulary; refuses to replace it.
  path = str(tmp_path / 'tiny.model')
  args = ['fit_text_vocab', '--gin_file=runs/fit_text_vocab.gin',
          f"--gin.VOCABULARY_PATH='{path}'", "--gin.TASK='embedded_music_tiny'",
          f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'", '--gin.VOCAB_SIZE=320']
  assert main.main(args) == 0
  assert vocabulary.caption_vocabulary(path).vocab_size == 320
  vocabulary.train_caption_vocabulary(texts, str(tmp_path / 'again.model'), 320)
  assert (tmp_path / 'tiny.model').read_bytes() == (tmp_path / 'again.model').read_bytes()
  gin.clear_config(clear_constants=False)
  with pytest.raises(FileExistsError, match='OVERWRITE'):
    main.main(args)


# ---------------------------------------------------------------------------
# The tiny MuLan with a from-scratch text tower, and its conditioner
# ---------------------------------------------------------------------------


def test_scratch_text_gin_files_build_their_model():
  from musiclm_jax.mulan.model import MuLanModel  # pylint: disable=g-import-not-at-top
  main.parse_gin(['examples/mulan_tiny_scratch_text_cpu.gin'], ["MODEL_DIR='unused'"])
  model = MuLanModel()
  assert model.pretrained_text_params is None and set(model.optimizers) == {'model'}
  tower = model.network.text_tower
  vocab = vocabulary.caption_vocabulary()
  assert tower.vocab_size == vocab.vocab_size  # the word table fits the vocabulary
  assert (tower.layers, tower.hidden) == (4, 128)
  assert tower.max_positions >= gin.query_parameter('%TEXT_LENGTH')
  import tasks.audio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  train_task = seqio.get_mixture_or_task(gin.query_parameter('%TRAIN_TASK'))
  assert train_task.output_features['text_ids'].vocabulary == vocab
  shapes = jax.eval_shape(model.init_variables, jax.random.key(0),
                          {'audio': jax.ShapeDtypeStruct((1, 96000), jnp.float32),
                           'text_ids': jax.ShapeDtypeStruct((1, 64), jnp.int32)})
  text = shapes['params']['model']['text_tower']
  assert text['embeddings']['word_embeddings'].value.shape == (1024, 128)
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(text))
  assert count == 941_056  # as models/mulan/tiny_scratch_text.gin says
  # The run's text tokenizer, as fit_conditioner reads it from a run's config.
  found = conditioning.run_text_tokenizer()
  assert isinstance(found, vocabulary.SentencePieceTokenizer)
  assert found.sha256 == vocabulary.SentencePieceTokenizer().sha256
  gin.clear_config(clear_constants=False)
  main.parse_gin(['examples/mulan_tiny_cpu.gin'], ["MODEL_DIR='unused'"])
  assert isinstance(conditioning.run_text_tokenizer(), WordPieceTokenizer)


def _sinusoids(n=8):
  """Clip i: 1 s of a sinusoid at 110 * 2^(i/2) Hz (distinct, half an octave apart)."""
  t = np.arange(SR) / SR
  freqs = 110.0 * 2.0 ** (np.arange(n)[:, None] / 2.0)
  return (0.5 * np.sin(2 * np.pi * freqs * t)).astype(np.float32)


@pytest.fixture(scope='module')
def scratch_trained(tokenizer):
  """The tiny from-scratch-text MuLan from gin (its AdamW at 1e-3, no warm-up), trained 30 steps
  on one fixed batch of 8 pairs: (model, loss before, loss after, network params). The eval loss
  is flat for the first ~15 steps, then falls (2.10 -> 1.63 measured).

  One device: the sharded MuLan step is tested in test_model.py, and a collective between
  simulated devices can miss XLA's rendezvous timeout on a loaded 2-core machine (seen here once
  with a 2-device mesh: an abort)."""
  from musiclm_jax.mulan.model import MuLanModel  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=False)
  main.parse_gin(['runs/train_mulan.gin', 'models/mulan/tiny_scratch_text.gin'],
                 ["MODEL_DIR='unused'", 'OptimizerConfig.warmup_steps=0'])
  model = MuLanModel()
  gin.clear_config(clear_constants=False)
  ids, mask = tokenizer.encode(CAPTIONS, L)
  batch = {'audio': _sinusoids(), 'text_ids': ids, 'text_mask': mask}
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  steps = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                        spec)
  state = steps.init(jax.random.PRNGKey(0))
  global_batch = steps.partitioner.host_local_batch_to_global(batch, steps.batch_shardings)
  evaluate = jax.jit(model.eval_metrics)

  def loss(state):
    total, n = jax.device_get(evaluate(state.params, state.model_state, batch)['loss'])
    return float(total / n)

  before = loss(state)
  for _ in range(30):
    state, _ = steps.train_step(state, global_batch)
  after = loss(state)
  params = jax.device_get(model.network_params(state.params))
  return model, before, after, params


def test_scratch_text_mulan_from_gin_learns_a_fixed_batch(scratch_trained):
  _, before, after, _ = scratch_trained
  assert np.isfinite(before) and after < before - 0.25, (before, after)


def test_conditioner_with_the_sentencepiece_tokenizer_saves_and_loads(scratch_trained, tokenizer,
                                                                      tmp_path):
  model, _, _, params = scratch_trained
  network = model.network
  cond = conditioning.MuLanConditioner(network, params, np.zeros((2, 1, 128)), SR, SR // 2,
                                       text_length=L, text_tokenizer=tokenizer)
  cond.codebooks, _ = conditioning.fit_rvq(cond.embed_text(CAPTIONS), 2, 4, num_iters=10)
  prompts = ['a calm piano melody', 'Café über 🎹, fast tempo']
  tokens = cond.text_tokens(prompts)
  assert tokens.shape == (2, 2) and tokens.dtype == np.int32
  with pytest.raises(ValueError, match='empty caption'):
    cond.text_tokens([' '])

  path = str(tmp_path / 'cond')
  conditioning.save_conditioner(path, cond)
  record = conditioning.read_conditioner_record(path)
  assert record['text_tokenizer']['type'] == 'sentencepiece'
  assert record['text_tokenizer']['sha256'] == tokenizer.sha256
  copied = os.path.join(path, record['text_tokenizer']['file'])
  with open(copied, 'rb') as f:
    assert f.read() == tokenizer.model_proto  # the directory is self-contained
  loaded = conditioning.load_conditioner(path)
  assert isinstance(loaded.text_tokenizer, vocabulary.SentencePieceTokenizer)
  assert loaded.text_tokenizer.sha256 == tokenizer.sha256
  np.testing.assert_array_equal(loaded.text_tokens(prompts), tokens)
  np.testing.assert_allclose(loaded.embed_text(prompts), cond.embed_text(prompts), atol=1e-6)

  # WordPiece ids do not fit this tower's word table: refused, not silently embedded.
  with pytest.raises(ValueError, match='does not fit'):
    conditioning.MuLanConditioner(network, params, cond.codebooks).embed_text(prompts)
  # A replaced vocabulary file is caught.
  vocabulary.train_caption_vocabulary(_small_texts(), str(tmp_path / 'other.model'), 320)
  with open(copied, 'wb') as f:
    f.write((tmp_path / 'other.model').read_bytes())
  with pytest.raises(ValueError, match='replaced'):
    conditioning.load_conditioner(path)
  # A record from before the tokenizer was recorded means WordPiece, which this tower refuses.
  with open(os.path.join(path, 'conditioner.json')) as f:
    old = json.load(f)
  del old['text_tokenizer']
  with open(os.path.join(path, 'conditioner.json'), 'w') as f:
    json.dump(old, f)
  with pytest.raises(ValueError, match='does not fit'):
    conditioning.load_conditioner(path)


def test_a_wordpiece_conditioner_record_without_a_tokenizer_entry_loads(tmp_path):
  from musiclm_jax.audio.features import LogMelFrontEnd  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.audio import ResNetAudioTower  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.model import MuLan  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.text import BertEncoder  # pylint: disable=g-import-not-at-top
  network = MuLan(audio_tower=ResNetAudioTower.tiny(front_end=LogMelFrontEnd(n_mels=16),
                                                    stage_widths=(8, 16), num_groups=2),
                  text_tower=BertEncoder(hidden=16, layers=1, heads=2, mlp=32, max_positions=32,
                                         pooler=False), embed_dim=8)
  params = jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, 4800)),
                          jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))['params']
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), params)
  path = str(tmp_path / 'cond')
  conditioning.save_conditioner(path, conditioning.MuLanConditioner(
      network, params, np.zeros((2, 4, 8), np.float32), 4800, 2400, text_length=16))
  record_path = os.path.join(path, 'conditioner.json')
  with open(record_path) as f:
    record = json.load(f)
  assert record['text_tokenizer'] == {'type': 'wordpiece', 'vocab_size': 30522}
  assert sorted(os.listdir(path)) == ['conditioner.json', 'variables']
  del record['text_tokenizer']
  with open(record_path, 'w') as f:
    json.dump(record, f)
  assert isinstance(conditioning.load_conditioner(path).text_tokenizer, WordPieceTokenizer)
  record['text_tokenizer'] = {'type': 'bytes'}
  with open(record_path, 'w') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match="unknown text_tokenizer type 'bytes'"):
    conditioning.load_conditioner(path)
