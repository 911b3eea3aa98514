"""Tests of the memorization check: match functions by hand, a model built to memorise, the CLI."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.generate import memorization as mem

SEMANTIC_CODES = 16
CYCLE = 8                 # codes 0-7 and 8-15 form two cycles the memorising model follows
EXAMPLE_FRAMES = 30       # 1.2 s at 25 Hz
PROMPT_SECONDS = (0.0, 0.2, 0.4)
GENERATE_SECONDS = 0.4    # 10 frames
WINDOW_SECONDS = 1.2


# ---------------------------------------------------------------------------------------------
# Match functions.


def test_exact_and_token_accuracy():
  generated = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
  target = np.array([[1, 2, 3, 4], [1, 0, 3, 0]])
  np.testing.assert_array_equal(mem.exact_matches(generated, target), [True, False])
  np.testing.assert_allclose(mem.token_accuracy(generated, target), [1.0, 0.5])
  assert mem.exact_matches([5, 6], [5, 6]).tolist() == [True]  # one row as [n]


def test_matching_cost_without_distances_is_one_minus_histogram_overlap():
  # Histograms {1: 2, 2: 1, 3: 1} and {1: 1, 2: 1, 4: 2}: overlap 1 + 1 = 2 of 4 tokens.
  cost = mem.matching_cost([[1, 1, 2, 3]], [[4, 2, 1, 4]])
  np.testing.assert_allclose(cost, [0.5])
  # Order does not matter; equal histograms cost 0; disjoint ones 1.
  np.testing.assert_allclose(mem.matching_cost([[3, 2, 1], [1, 1, 1]], [[1, 2, 3], [2, 2, 2]]),
                             [0.0, 1.0])
  # The closed form equals the assignment with 0/1 distances.
  rng = np.random.default_rng(0)
  g, t = rng.integers(0, 5, (6, 12)), rng.integers(0, 5, (6, 12))
  np.testing.assert_allclose(mem.matching_cost(g, t),
                             mem.matching_cost(g, t, 1.0 - np.eye(5)))


def test_token_distances_and_matching_cost_with_centroids():
  # Centroids on a line at 0, 1, 3: distances 1, 3, 2; mean of distinct pairs 2.
  d = mem.token_distances([[0.0], [1.0], [3.0]])
  np.testing.assert_allclose(d, [[0, 0.5, 1.5], [0.5, 0, 1.0], [1.5, 1.0, 0]], atol=1e-12)
  # [0, 2] against [1, 1]: both tokens go to a 1: (0.5 + 1.0) / 2.
  np.testing.assert_allclose(mem.matching_cost([[0, 2]], [[1, 1]], d), [0.75])
  # [0, 2] against [2, 1]: the best matching is 2-2 and 0-1: (0 + 0.5) / 2, not 0-2 and 2-1.
  np.testing.assert_allclose(mem.matching_cost([[0, 2]], [[2, 1]], d), [0.25])
  with pytest.raises(ValueError, match=r'codes must lie in \[0, 3\)'):
    mem.matching_cost([[0, 3]], [[1, 1]], d)
  with pytest.raises(ValueError, match='at least|coincide|k >= 2'):
    mem.token_distances([[1.0, 2.0]])


def test_match_statistics_counts_and_fractions():
  stats = mem.match_statistics([[1, 2], [1, 2], [3, 3], [4, 4]],
                               [[1, 2], [2, 1], [3, 4], [1, 2]], threshold=0.6)
  assert stats['examples'] == 4
  assert (stats['exact'], stats['exact_fraction']) == (1, 0.25)
  # Costs 0, 0, 0.5, 1: three below 0.6.
  assert (stats['approximate'], stats['approximate_fraction']) == (3, 0.75)
  assert stats['per_example']['matching_cost'] == [0.0, 0.0, 0.5, 1.0]
  assert stats['token_accuracy'] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
  with pytest.raises(ValueError, match='one shape'):
    mem.match_statistics([[1, 2]], [[1, 2, 3]], threshold=0.5)


def test_chance_partners_and_negative_pairs_avoid_own_group():
  groups = ['a', 'a', 'b', 'b', 'c']
  partners = mem.chance_partners(5, groups, seed=1)
  for i, j in enumerate(partners):
    assert groups[i] != groups[j]
  assert (mem.chance_partners(3, seed=0) != np.arange(3)).all()
  assert (mem.chance_partners(2, ['x', 'x']) == [1, 0]).all()  # one group: any other example
  with pytest.raises(ValueError, match='at least 2'):
    mem.chance_partners(1)
  pairs = mem.negative_pairs(5, groups)
  assert len(pairs) == 5 * 4 - 2 * 2  # ordered pairs across groups
  assert all(groups[i] != groups[j] for i, j in pairs)
  assert len(mem.negative_pairs(5, None, max_pairs=7)) == 7


# ---------------------------------------------------------------------------------------------
# A stage that memorised its two tunes, and one that did not.


def _spec():
  from musiclm_jax.stages.spec import TokenSizes, semantic_stage_spec  # pylint: disable=g-import-not-at-top
  return semantic_stage_spec(TokenSizes(semantic_codes=SEMANTIC_CODES, mulan_levels=2,
                                        mulan_codes=8))


def _model():
  from musiclm_jax.nn.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  config = TransformerConfig(vocab_size=0, embed_dim=64, num_layers=1, num_heads=2, head_dim=16,
                             mlp_dim=64, dropout_rate=0.0, relative_num_buckets=16,
                             relative_max_distance=64)
  return StageModel(_spec(), config, vocab_multiple=8)


def _next_code(spec, token_id: int) -> int:
  """The semantic code the memorising model puts after `token_id`.

  Semantic code c -> the next code of its cycle (0..7 or 8..15); the second MuLan level's code
  k -> the first code of cycle 1 (k < 4) or 2 (k >= 4); anything else -> code 0.
  """
  semantic = spec.offset('semantic')
  if semantic <= token_id < semantic + SEMANTIC_CODES:
    c = token_id - semantic
    return c // CYCLE * CYCLE + (c % CYCLE + 1) % CYCLE
  second_level = spec.level_offsets('mulan')[1]
  if second_level <= token_id < second_level + 8:
    return 0 if token_id - second_level < 4 else CYCLE
  return 0


def _memorising_params(model):
  """Parameters of a bigram model: greedy decoding follows `_next_code` exactly.

  Attention and MLP outputs are zero, so the final LayerNorm sees the one-hot embedding of the
  last token; the read-out's column of id y is the sum of the normalised one-hots of the ids
  whose next code is y (logit 64 for the right id, about -1 for the others).
  """
  from tests.generate.tiny_pipeline import random_variables  # pylint: disable=g-import-not-at-top
  spec, vocab, dim = model.spec, model.config.vocab_size, model.config.embed_dim
  params = random_variables(model.module, jnp.zeros((1, 8), jnp.int32), seed=5)['params']
  params['token_embedder']['embedding'] = np.eye(vocab, dim, dtype=np.float32)
  params['layers_0']['self_attention']['out']['kernel'] = np.zeros_like(
      params['layers_0']['self_attention']['out']['kernel'])
  params['layers_0']['mlp']['wo']['kernel'] = np.zeros_like(
      params['layers_0']['mlp']['wo']['kernel'])
  onehots = np.eye(vocab, dim)
  normalised = (onehots - onehots.mean(1, keepdims=True)) / onehots.std(1, keepdims=True)
  readout = np.zeros((dim, vocab), np.float32)
  for token_id in range(vocab):
    readout[:, spec.offset('semantic') + _next_code(spec, token_id)] += normalised[token_id]
  params['logits_dense']['kernel'] = readout
  return params


def _examples(num: int = 4) -> dict[str, np.ndarray]:
  """Clips of alternating tunes: cycle 1 (even examples) and cycle 2 (odd ones)."""
  mulan, semantic, ids, tunes = [], [], [], []
  for i in range(num):
    tune = i % 2
    mulan.append([i % 8, 1 + 4 * tune])  # the second level's code picks the cycle
    start = tune * CYCLE
    semantic.append([start + (t + i) % CYCLE for t in range(EXAMPLE_FRAMES)])
    ids.append(f'tune{tune}/r{i}'.encode())
    tunes.append(f'tune{tune}'.encode())
  # Example i starts at phase i of its cycle; its MuLan tokens still lead to code 0 or 8, so
  # with a 0 s prompt only phase-0 examples continue correctly (the others need a prompt).
  return {'mulan_tokens': np.array(mulan, np.int32),
          'semantic_tokens': np.array(semantic, np.int32),
          'id': np.array(ids, object), 'melody_id': np.array(tunes, object)}


@pytest.fixture(scope='module')
def stage():
  model = _model()
  return model, _memorising_params(model)


@pytest.fixture(scope='module')
def random_stage():
  from tests.generate.tiny_pipeline import random_variables  # pylint: disable=g-import-not-at-top
  model = _model()
  return model, random_variables(model.module, jnp.zeros((1, 8), jnp.int32), seed=7)['params']


def _check(model, params, examples, **kwargs):
  kwargs = {'prompt_seconds': PROMPT_SECONDS, 'generate_seconds': GENERATE_SECONDS,
            'window_seconds': WINDOW_SECONDS, 'approximate_threshold': 0.5,
            'groups': examples['melody_id'], 'batch_size': 3, **kwargs}
  return mem.memorization_check(model, params, examples, **kwargs)


@pytest.fixture(scope='module')
def memorised_report(stage):
  return _check(*stage, _examples())


def test_memorised_stage_reproduces_its_training_clips(memorised_report):
  report = memorised_report
  rows = {r['prompt_seconds']: r for r in report['rows']}
  assert sorted(rows) == list(PROMPT_SECONDS)
  # 0 s prompt: only the examples starting at phase 0 of their cycle (example 0 of cycle 1;
  # example 1 starts at phase 1) continue right.
  assert rows[0.0]['model']['per_example']['exact'] == [True, False, False, False]
  assert rows[0.0]['hold'] is None
  for s in PROMPT_SECONDS[1:]:
    model = rows[s]['model']
    assert (model['exact'], model['exact_fraction']) == (4, 1.0)
    assert model['approximate'] == 4 and model['token_accuracy'] == 1.0
    assert model['matching_cost'] == 0.0
    # Chance: a continuation of one cycle against the other cycle's clip shares no token.
    chance = rows[s]['chance']
    assert (chance['exact'], chance['approximate'], chance['token_accuracy']) == (0, 0, 0.0)
    assert chance['matching_cost'] == 1.0
    assert rows[s]['hold']['exact'] == 0
    assert rows[s]['constant_continuations'] == 0
  assert rows[0.2]['prompt_tokens'] == 1 + 2 + 5
  assert rows[0.4]['generated_tokens'] == 10
  assert report['examples'] == ['tune0/r0', 'tune1/r1', 'tune0/r2', 'tune1/r3']
  assert report['threshold']['source'] == 'given'
  assert report['settings']['generate_frames'] == 10


def test_random_stage_does_not(random_stage):
  report = _check(*random_stage, _examples())
  for row in report['rows']:
    assert row['model']['exact'] == 0
    assert row['model']['token_accuracy'] < 0.5


def test_calibrated_threshold_and_markdown(stage):
  examples = _examples()
  # Centroids: the two cycles far apart, codes within a cycle close, every cross-cycle pair
  # equally far (so all negative pairs cost the same, and none lies below their quantile).
  centroids = np.concatenate([10.0 * np.eye(2)[np.arange(SEMANTIC_CODES) // CYCLE],
                              0.1 * np.eye(SEMANTIC_CODES)], axis=1)
  report = _check(*stage, examples, approximate_threshold=None, calibration_quantile=0.01,
                  distances=mem.token_distances(centroids), prompt_seconds=(0.4,))
  threshold = report['threshold']
  assert threshold['source'].startswith('calibrated')
  assert threshold['negative_pairs'] == 8  # ordered pairs of the two tunes' renderings
  assert threshold['negatives_below'] == 0.0
  row = report['rows'][0]
  assert threshold['value'] == pytest.approx(row['chance']['matching_cost'])
  assert threshold['value'] > 1.0  # cross-cycle tokens are farther apart than the mean pair
  assert row['model']['approximate'] == 4 and row['chance']['approximate'] == 0
  table = mem.markdown(report)
  assert table.splitlines()[0].startswith('| prompt s |')
  assert '| 0.4 | 13 | 4 | 4 (100.0%) | 4 (100.0%) |' in table
  json.dumps(report)  # JSON-ready


def test_errors_before_any_decoding(stage):
  model, params = stage
  examples = _examples()
  with pytest.raises(ValueError, match='exceeds the window of 1 s'):
    _check(model, params, examples, window_seconds=1.0, prompt_seconds=(0.8,))
  with pytest.raises(ValueError, match='longer than the examples'):
    _check(model, params, examples, window_seconds=None, prompt_seconds=(1.0,))
  with pytest.raises(ValueError, match='prompt_seconds=0.01 s is not a whole number'):
    _check(model, params, examples, prompt_seconds=(0.01,))
  with pytest.raises(ValueError, match='at least 2 examples'):
    _check(model, params, {k: v[:1] for k, v in examples.items()}, groups=None)
  with pytest.raises(KeyError, match='mulan_tokens'):
    _check(model, params, {k: v for k, v in examples.items() if k != 'mulan_tokens'})
  with pytest.raises(KeyError, match='semantic_tokens'):
    _check(model, params, {k: v for k, v in examples.items() if k != 'semantic_tokens'})


def test_time_aligned_conditions_are_refused():
  from musiclm_jax.stages.spec import TokenSizes, coarse_stage_spec  # pylint: disable=g-import-not-at-top
  spec = coarse_stage_spec(TokenSizes(semantic_codes=16, mulan_levels=2, mulan_codes=8,
                                      codec_levels=4, codec_codes=32, coarse_levels=2))
  with pytest.raises(ValueError, match="time-aligned stream 'semantic'"):
    mem.condition_prompt(spec, {'mulan_tokens': np.zeros((2, 2), np.int32),
                                'semantic_tokens': np.zeros((2, 10), np.int32),
                                'codec_tokens': np.zeros((2, 20, 4), np.int32)})


# ---------------------------------------------------------------------------------------------
# The command line, on a tiny token cache and an exported stage.


def _write_cache(task_dir: str, examples: dict[str, np.ndarray], split: str = 'train',
                 features=('mulan_tokens', 'semantic_tokens', 'id', 'melody_id')) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(task_dir)
  shapes = {'mulan_tokens': ([None], 'int32'), 'semantic_tokens': ([None], 'int32'),
            'id': ([], 'string'), 'melody_id': ([], 'string')}
  with open(os.path.join(task_dir, f'info.{split}.json'), 'w') as f:
    json.dump({'features': {k: {'shape': shapes[k][0], 'dtype': shapes[k][1]}
                            for k in features}, 'num_shards': 1}, f)
  with tf.io.TFRecordWriter(os.path.join(task_dir, f'{split}.tfrecord-00000-of-00001')) as w:
    for i in range(len(examples['id'])):
      feature = {}
      for k in features:
        if shapes[k][1] == 'string':
          feature[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[examples[k][i]]))
        else:
          feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=examples[k][i]))
      w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  open(os.path.join(task_dir, 'COMPLETED'), 'w').close()


@pytest.fixture(scope='module')
def cli_dirs(stage, tmp_path_factory):
  from musiclm_jax.generate import export  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('memorization')
  stage_dir = export.save_stage(str(root / 'stage'), *stage, crop_seconds=WINDOW_SECONDS)
  cache = root / 'cache'
  _write_cache(str(cache / 'tiny_stage_tokens'), _examples(5))
  no_semantic = root / 'no_semantic'
  _write_cache(str(no_semantic), _examples(5), features=('mulan_tokens', 'id'))
  return {'stage': stage_dir, 'cache': str(cache), 'no_semantic': str(no_semantic),
          'root': str(root)}


def _main(dirs, *extra, stage_dir=None, cache_dir=None):
  return mem.main([f'--stage_dir={stage_dir or dirs["stage"]}',
                   f'--cache_dir={cache_dir or dirs["cache"]}', '--num_examples=4',
                   '--prompt_seconds=0,0.2,0.4', '--generate_seconds=0.4', '--batch_size=3',
                   '--no_progress', *extra])


def test_cli_prints_a_table_and_writes_json(cli_dirs, capsys):
  out = os.path.join(cli_dirs['root'], 'report', 'memorization.json')
  assert _main(cli_dirs, f'--out={out}', '--approximate_threshold=0.5') == 0
  printed = capsys.readouterr().out
  assert '| 0.4 | 13 | 4 | 4 (100.0%) | 4 (100.0%) |' in printed
  with open(out) as f:
    report = json.load(f)
  assert [r['model']['exact'] for r in report['rows']] == [1, 4, 4]
  assert report['source']['groups'] == 'melody_id'
  assert report['source']['centroids'].startswith('not found')  # the cache has no provenance
  assert report['settings']['window_seconds'] == WINDOW_SECONDS
  assert '--approximate_threshold=0.5' in report['source']['command']
  assert not [f for f in os.listdir(os.path.dirname(out)) if f != 'memorization.json']


@pytest.mark.parametrize('kind, message', [
    ('missing_stage', 'no such directory'),
    ('missing_cache', 'no such directory'),
    ('no_semantic', "no ['semantic_tokens']"),
    ('window', 'exceeds the 1.2 s window'),
    ('examples', 'only 0 examples with at least'),
    ('too_many', 'has only 5 examples'),
])
def test_cli_errors(cli_dirs, capsys, kind, message):
  missing = os.path.join(cli_dirs['root'], 'missing')
  args = {
      'missing_stage': dict(stage_dir=missing),
      'missing_cache': dict(cache_dir=missing),
      'no_semantic': dict(cache_dir=cli_dirs['no_semantic']),
  }.get(kind, {})
  extra = {'window': ['--prompt_seconds=1'],
           'too_many': ['--num_examples=9']}.get(kind, [])
  if kind == 'examples':  # a window longer than the clips, allowed by a longer-trained stage
    from musiclm_jax.generate import export  # pylint: disable=g-import-not-at-top
    model, params, _ = export.load_stage_dir(cli_dirs['stage'])
    args = dict(stage_dir=export.save_stage(os.path.join(cli_dirs['root'], 'long_stage'),
                                            model, params, crop_seconds=2.0, overwrite=True))
    extra = ['--prompt_seconds=1.2']
  assert _main(cli_dirs, *extra, **args) == 2
  err = capsys.readouterr().err
  assert err.startswith('memorization: ') and message in err, err


def test_semantic_centroids_of_a_tokenizer_dir(tmp_path):
  from musiclm_jax.semantic.tokenizer import save_tokenizer  # pylint: disable=g-import-not-at-top
  from tests.generate import tiny_pipeline  # pylint: disable=g-import-not-at-top
  tokenizer, params = tiny_pipeline.semantic_tokenizer()
  directory = save_tokenizer(str(tmp_path / 'tokenizer'), tokenizer, params, {})
  centroids, where = mem.semantic_centroids(str(tmp_path), directory)
  np.testing.assert_array_equal(centroids, params['centroids'])
  assert where == directory
  assert mem.semantic_centroids(str(tmp_path), 'none') == (None, 'none asked for')
  with pytest.raises(FileNotFoundError, match='no tokenizer.json'):
    mem.semantic_centroids(str(tmp_path), str(tmp_path))
