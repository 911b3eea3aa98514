"""Audio SeqIO preprocessors, the frozen tokenizer (random init and checkpoints) and its model."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from musiclm_jax.data import preprocessors
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer, fingerprint
from musiclm_jax.nn.random_projection import RandomProjectionQuantizer
from musiclm_jax.train import partitioning
from musiclm_jax.train.checkpoints import Checkpointer
from musiclm_jax.train.train_state import TrainState
from tests.data import synthetic_audio_task as synthetic

tf = preprocessors.tf
SR = 24000


def _dataset(examples, spec):
  return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)


def _audio_ds(audios, dtype=tf.float32):
  examples = [{'audio': a, 'id': f'{i}'.encode()} for i, a in enumerate(audios)]
  return _dataset(examples, {'audio': tf.TensorSpec([None], dtype),
                             'id': tf.TensorSpec([], tf.string)})


def _crops(ds_seed, audios, **kwargs):
  with seqio.utils.map_seed_manager(ds_seed):
    ds = preprocessors.random_crop(_audio_ds(audios), **kwargs)
  return [ex['audio'] for ex in ds.as_numpy_iterator()]


def test_audio_to_float_range():
  x = np.array([-32768, -1, 0, 1, 32767], np.int16)
  out = next(preprocessors.audio_to_float(_audio_ds([x], tf.int16)).as_numpy_iterator())['audio']
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, x / 32768.0)
  assert out.min() == -1.0 and out.max() < 1.0


def test_random_crop_is_deterministic_per_seed():
  # A ramp: a crop's first value is its offset.
  audios = [np.arange(20000, dtype=np.float32) + 100000 * i for i in range(6)]
  a = _crops(7, audios, clip_samples=1000)
  b = _crops(7, audios, clip_samples=1000)
  c = _crops(8, audios, clip_samples=1000)
  assert all(len(x) == 1000 for x in a)
  for x, src in zip(a, audios):  # a contiguous piece of its source
    offset = int(x[0] - src[0])
    np.testing.assert_array_equal(x, src[offset:offset + 1000])
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert len({int(x[0]) % 100000 for x in a}) > 1  # examples get different offsets


def test_random_crop_pads_short_clips_and_takes_seconds():
  short = np.linspace(-1, 1, 500).astype(np.float32)
  (padded,) = _crops(1, [short], clip_seconds=1000 / SR, sample_rate=SR)
  assert padded.shape == (1000,)
  np.testing.assert_array_equal(padded[:500], short)
  assert not padded[500:].any()
  (kept,) = _crops(1, [short], clip_samples=1000, pad_short=False)
  np.testing.assert_array_equal(kept, short)
  with pytest.raises(ValueError, match='exactly one'):
    _crops(1, [short], clip_samples=10, clip_seconds=1.0)


def test_resample_length_and_frequency():
  n = SR  # one second of 1 kHz
  x = np.sin(2 * np.pi * 1000 * np.arange(n) / SR).astype(np.float32)
  ds = preprocessors.resample(_audio_ds([x]), from_rate=SR, to_rate=16000)
  y = next(ds.as_numpy_iterator())['audio']
  assert y.dtype == np.float32 and len(y) == round(n * 16000 / SR)
  spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
  assert abs(np.argmax(spectrum) * 16000 / len(y) - 1000) <= 1.0
  assert preprocessors.resample(ds, from_rate=16000, to_rate=16000) is ds


def _tiny_tokenizer(**kwargs):
  return FrozenTokenizer(model=RandomProjectionQuantizer(frame_size=64, hop=32, dim=4,
                                                         codebook_size=16),
                         output_feature='tokens', input_samples=320, batch_size=4, **kwargs)


def test_tokenize_audio_equals_the_tokenizer_and_keeps_other_features():
  tok = _tiny_tokenizer()
  rng = np.random.default_rng(0)
  audios = [rng.normal(size=320).astype(np.float32) for _ in range(5)]  # 5: a short last batch
  audios[2] = audios[2][:200]  # shorter: zero-padded to input_samples
  examples = [{'audio': a, 'aspects': np.array([b'x'] * (i % 3)), 'id': f'{i}'.encode()}
              for i, a in enumerate(audios)]
  ds = _dataset(examples, {'audio': tf.TensorSpec([None], tf.float32),
                           'aspects': tf.TensorSpec([None], tf.string),
                           'id': tf.TensorSpec([], tf.string)})
  out_ds = preprocessors.tokenize_audio(ds, tokenizer=tok)
  assert out_ds.element_spec['tokens'] == tf.TensorSpec([10], tf.int32)
  assert out_ds.element_spec['aspects'] == tf.TensorSpec([None], tf.string)
  out = list(out_ds.as_numpy_iterator())
  padded = np.stack([np.pad(a, (0, 320 - len(a))) for a in audios])
  expected = tok(padded)
  assert expected.shape == (5, 10) and expected.dtype == np.int32
  assert [ex['id'] for ex in out] == [ex['id'] for ex in examples]
  np.testing.assert_array_equal(np.stack([ex['tokens'] for ex in out]), expected)
  assert [len(ex['aspects']) for ex in out] == [0, 1, 2, 0, 1]
  dropped = next(preprocessors.tokenize_audio(ds, tokenizer=tok, keep_input=False)
                 .as_numpy_iterator())
  assert 'audio' not in dropped and 'tokens' in dropped
  too_long = _audio_ds([np.zeros(400, np.float32)])
  with pytest.raises(tf.errors.InvalidArgumentError, match='random_crop'):
    list(preprocessors.tokenize_audio(too_long, tokenizer=tok).as_numpy_iterator())


def test_random_projection_quantizer():
  model = RandomProjectionQuantizer(frame_size=64, hop=32, dim=4, codebook_size=16,
                                    num_codebooks=3)
  x = np.random.default_rng(1).normal(size=(2, 330)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, method='tokenize')
  # Every logical axis is one the partitioning rules know.
  partitioning.logical_to_mesh_specs(nn.get_partition_spec(variables),
                                     partitioning.standard_logical_axis_rules())
  tokens = model.apply(nn.meta.unbox(variables), x, method='tokenize')
  assert tokens.shape == (2, 330 // 32, 3) and tokens.dtype == jnp.int32
  assert int(tokens.min()) >= 0 and int(tokens.max()) < 16
  louder = model.apply(nn.meta.unbox(variables), 4 * x, method='tokenize')
  np.testing.assert_array_equal(tokens, louder)  # per-frame standardised log spectra


def test_random_init_provenance_is_stable_and_tracks_the_seed():
  a, b, c = _tiny_tokenizer(), _tiny_tokenizer(), _tiny_tokenizer(init_seed=1)
  pa = a.provenance()
  assert pa == b.provenance()
  assert pa['params_sha256'] != c.provenance()['params_sha256']
  assert pa['model']['class'].endswith('RandomProjectionQuantizer')
  assert pa['model']['config']['codebook_size'] == 16 and 'parent' not in pa['model']['config']
  assert pa['weights'] == {'source': 'random_init', 'init_seed': 0}
  assert pa['output'] == {'shape': [10], 'dtype': 'int32'}


def _save_train_state(directory, step, params):
  ckpt = Checkpointer(directory, async_save=False, keep=None)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=jnp.asarray(step), params={'model': params, 'other': {'w': jnp.ones(3)}},
                     opt_state={'model': jax.tree_util.tree_map(jnp.zeros_like, params)},
                     model_state={}, rng=jax.random.key_data(jax.random.PRNGKey(0)),
                     skipped_in_a_row=zero, skipped_total=zero)
  ckpt.save(step, state, {'batches_consumed': step}, force=True)
  ckpt.close()


def test_loads_a_checkpointer_checkpoint_and_fingerprints_it(tmp_path):
  ref = _tiny_tokenizer(init_seed=3)
  params = ref.variables()['params']
  changed = jax.tree_util.tree_map(lambda p: p * 2, params)
  directory = str(tmp_path / 'checkpoints')
  _save_train_state(directory, 1, params)
  _save_train_state(directory, 2, changed)

  at1 = _tiny_tokenizer(checkpoint_dir=directory, step=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, at1.variables(), {'params': params})
  audio = np.random.default_rng(2).normal(size=(3, 320)).astype(np.float32)
  np.testing.assert_array_equal(at1(audio), ref(audio))
  p1 = at1.provenance()
  assert p1['params_sha256'] == ref.provenance()['params_sha256']
  assert p1['weights']['step'] == 1 and p1['weights']['layout'] == 'trainer'

  latest = _tiny_tokenizer(checkpoint_dir=str(tmp_path))  # a MODEL_DIR works too
  p2 = latest.provenance()
  assert p2['weights']['step'] == 2
  assert p2['params_sha256'] == fingerprint({'params': changed}) != p1['params_sha256']
  with pytest.raises(FileNotFoundError, match='no step 5'):
    _tiny_tokenizer(checkpoint_dir=directory, step=5).variables()
  with pytest.raises(KeyError, match='nope'):
    _tiny_tokenizer(checkpoint_dir=directory, params_group='nope').variables()


def test_loads_a_params_only_checkpoint(tmp_path):
  ref = _tiny_tokenizer(init_seed=4)
  path = tmp_path / 'params_only'
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, ref.variables())
  tok = _tiny_tokenizer(checkpoint_dir=str(path))
  assert tok.provenance()['params_sha256'] == ref.provenance()['params_sha256']
  assert tok.provenance()['weights']['layout'] == 'pytree'
  bare = tmp_path / 'params_tree_only'  # the params tree without the 'params' key
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(bare, ref.variables()['params'])
  tok = _tiny_tokenizer(checkpoint_dir=str(bare))
  assert tok.provenance()['params_sha256'] == ref.provenance()['params_sha256']
  with pytest.raises(FileNotFoundError, match='neither'):
    _tiny_tokenizer(checkpoint_dir=str(tmp_path / 'empty')).variables()


def test_synthetic_task_on_the_fly():
  task = seqio.TaskRegistry.get(synthetic.TASK)
  ds = task.get_dataset(None, split='validation', shuffle=False, seed=5)
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == synthetic.SPLITS['validation']
  for ex in examples:
    assert ex['audio'].shape == (synthetic.CLIP_SAMPLES,) and ex['audio'].dtype == np.float32
    tokens = ex[synthetic.TOKEN_FEATURE]
    assert tokens.shape == (synthetic.CLIP_SAMPLES // 480,) and tokens.max() < 64
    np.testing.assert_array_equal(ex['targets'][:-1], tokens + synthetic.FIRST_TOKEN)
    assert ex['targets'][-1] == 1  # EOS
    assert ex['caption'].startswith(b'a sine tone')


def test_audio_features_are_optional_side_features():
  # The synthetic task's output features include these, so seqio's validation of its dataset
  # (test_synthetic_task_on_the_fly) is their check; here only their kind.
  kinds = {name: (f.dtype, f.rank, f.required, f.add_eos)
           for name, f in preprocessors.AUDIO_FEATURES.items()}
  assert kinds == {'audio': (tf.float32, 1, False, False), 'caption': (tf.string, 0, False, False),
                   'aspects': (tf.string, 1, False, False), 'id': (tf.string, 0, False, False)}
  tokens = preprocessors.token_feature(1024, rank=2)
  assert (tokens.dtype, tokens.rank, tokens.vocabulary.vocab_size) == (tf.int32, 2, 1024)


def test_gin_builds_a_tokenizer():
  gin.clear_config(clear_constants=False)
  try:
    gin.parse_config(['FrozenTokenizer.model = @RandomProjectionQuantizer()',
                      'RandomProjectionQuantizer.codebook_size = 16',
                      "FrozenTokenizer.output_feature = 'semantic_tokens'",
                      'FrozenTokenizer.input_samples = 960'])
    tok = FrozenTokenizer()
  finally:
    gin.clear_config(clear_constants=False)
  model = tok.provenance()['model']
  assert model['class'] == 'musiclm_jax.nn.random_projection.RandomProjectionQuantizer'
  assert model['config']['codebook_size'] == 16
  assert tok(np.zeros((1, 960), np.float32)).shape == (1, 2)
