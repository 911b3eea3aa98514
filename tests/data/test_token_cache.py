"""Token caching on Apache Beam (DirectRunner): round trip, provenance checks, safe overwrites.

One `musiclm-jax tokenize` run per session (the `cache_root` fixture) is shared by the tests; the
others copy its output or fabricate small caches, so only the overwrite test runs Beam again.
"""
import hashlib
import json
import os
import shutil

import gin
import numpy as np
import pytest
import seqio

from musiclm_jax import main
from musiclm_jax.data import token_cache
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.data.seqio_input import DatasetConfig, get_host_dataset
from musiclm_jax.train.checkpoints import Checkpointer
from musiclm_jax.train.train_state import TrainState
from tests.data import synthetic_audio_task as synthetic

TASK = synthetic.TASK


@pytest.fixture(scope='module')
def cache_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('token_cache'))
  gin.clear_config(clear_constants=False)
  try:
    rc = main.main(['tokenize', '--gin_file=examples/tokenize_synthetic_tones.gin',
                    f"--gin.CACHE_DIR='{root}'"])
  finally:
    gin.clear_config(clear_constants=False)
  assert rc == 0
  return root


def _task_dir(root, name=TASK):
  return token_cache.task_cache_dir(name, root)


def _copy_cache(root, dest_root, name):
  shutil.copytree(_task_dir(root), _task_dir(dest_root, name))


def _digests(directory):
  return {f: hashlib.sha256(open(os.path.join(directory, f), 'rb').read()).hexdigest()
          for f in sorted(os.listdir(directory))}


def test_cache_files_and_provenance(cache_root):
  files = set(os.listdir(_task_dir(cache_root)))
  for split in ('train', 'validation'):
    assert {f'info.{split}.json', f'stats.{split}.json', f'{split}.tfrecord-00000-of-00002',
            f'{split}.tfrecord-00001-of-00002'} <= files
  assert {'COMPLETED', 'provenance.json'} <= files
  assert not [f for f in os.listdir(cache_root) if '.incomplete-' in f]
  record = json.load(open(os.path.join(_task_dir(cache_root), 'provenance.json')))
  assert record['task'] == TASK and record['splits'] == ['train', 'validation']
  assert record['num_examples'] == synthetic.SPLITS
  assert record['seqio_version'] == seqio.__version__ and record['runner'] == 'DirectRunner'
  (tok,) = record['tokenizers']
  assert tok['output_feature'] == synthetic.TOKEN_FEATURE
  assert tok['params_sha256'] == synthetic.tokenizer().provenance()['params_sha256']
  assert token_cache.check_cache_provenance(TASK, cache_root)['task'] == TASK


def test_cached_tokens_equal_on_the_fly_tokens(cache_root):
  seqio.add_global_cache_dirs([cache_root])
  task = seqio.TaskRegistry.get(TASK)
  tok = synthetic.tokenizer()
  for split, n in synthetic.SPLITS.items():
    cached = {ex['id']: ex for ex in task.get_dataset(None, split=split, use_cached=True,
                                                      shuffle=False).as_numpy_iterator()}
    fresh = {ex['id']: ex for ex in token_cache.precache_examples(TASK, split)}
    assert len(cached) == len(fresh) == n and set(cached) == set(fresh)
    for key, ex in fresh.items():
      np.testing.assert_array_equal(cached[key]['audio'], ex['audio'])
      np.testing.assert_array_equal(cached[key][synthetic.TOKEN_FEATURE],
                                    ex[synthetic.TOKEN_FEATURE])
      assert cached[key]['caption'] == ex['caption']
      np.testing.assert_array_equal(cached[key]['aspects'], ex['aspects'])
      # Post-cache preprocessing ran on the cached tokens.
      np.testing.assert_array_equal(cached[key]['targets'][:-1],
                                    ex[synthetic.TOKEN_FEATURE] + synthetic.FIRST_TOKEN)
    audio = np.stack([ex['audio'] for ex in fresh.values()])
    np.testing.assert_array_equal(
        tok(audio), np.stack([cached[k][synthetic.TOKEN_FEATURE] for k in fresh]))


def test_dataset_config_reads_a_fresh_cache(cache_root):
  config = DatasetConfig(TASK, {'targets': 32}, split='validation', batch_size=3, shuffle=False,
                         use_cached=True, cache_dir=cache_root)
  (batch,) = list(get_host_dataset(config, num_epochs=1).as_numpy_iterator())
  targets = batch['decoder_target_tokens']
  assert targets.shape == (3, 32)
  frames = synthetic.CLIP_SAMPLES // 480
  assert (targets[:, frames] == 1).all() and (targets[:, :frames] >= synthetic.FIRST_TOKEN).all()


def test_stale_cache_raises_through_dataset_config(cache_root, tmp_path):
  name = f'{TASK}_seed1'
  synthetic.register(name, synthetic.tokenizer(init_seed=1))
  _copy_cache(cache_root, str(tmp_path), name)  # made by the seed-0 tokenizer
  config = DatasetConfig(name, {'targets': 32}, split='train', use_cached=True,
                         cache_dir=str(tmp_path))
  with pytest.raises(token_cache.StaleCacheError) as e:
    get_host_dataset(config)
  message = str(e.value)
  assert name in message and _task_dir(str(tmp_path), name) in message
  assert 'params_sha256' in message and 'weights.init_seed: 0 (cache) != 1 (task now)' in message


def test_stale_checkpoint_step_is_named(tmp_path):
  # Two checkpoint steps of the tokenizer; a cache recorded at step 1, the task now at step 2.
  ref = synthetic.tokenizer(init_seed=5)
  params = ref.variables()['params']
  directory = str(tmp_path / 'checkpoints')
  for step, scale in ((1, 1.0), (2, 3.0)):
    ckpt = Checkpointer(directory, async_save=False, keep=None)
    zero = np.zeros((), np.int32)
    ckpt.save(step, TrainState(step=np.int32(step),
                               params={'model': {k: v * scale for k, v in params.items()}},
                               opt_state={}, model_state={}, rng=np.zeros(2, np.uint32),
                               skipped_in_a_row=zero, skipped_total=zero), {}, force=True)
    ckpt.close()
  old = synthetic.register(f'{TASK}_ckpt_step1', synthetic.tokenizer(checkpoint_dir=directory,
                                                                      step=1))
  new = synthetic.register(f'{TASK}_ckpt_latest', synthetic.tokenizer(checkpoint_dir=directory))
  root = str(tmp_path / 'cache')
  for task in (old, new):  # a minimal completed cache whose provenance is the step-1 task's
    os.makedirs(_task_dir(root, task.name))
    open(os.path.join(_task_dir(root, task.name), 'COMPLETED'), 'w').close()
    with open(os.path.join(_task_dir(root, task.name), 'provenance.json'), 'w') as f:
      json.dump({'splits': ['train'], **token_cache.task_provenance(old)}, f)
  assert token_cache.check_cache_provenance(old.name, root)
  with pytest.raises(token_cache.StaleCacheError) as e:
    token_cache.check_cache_provenance(new.name, root)
  message = str(e.value)
  assert 'params_sha256' in message and 'weights.step: 1 (cache) != 2 (task now)' in message
  with pytest.raises(token_cache.MissingCacheError, match='validation'):
    token_cache.check_cache_provenance(old.name, root, split='validation')


def test_missing_cache_and_missing_provenance(cache_root, tmp_path):
  name = f'{TASK}_never_cached'
  synthetic.register(name)
  with pytest.raises(token_cache.MissingCacheError, match=name):
    get_host_dataset(DatasetConfig(name, {'targets': 32}, use_cached=True,
                                   cache_dir=str(tmp_path / 'empty')))
  _copy_cache(cache_root, str(tmp_path), name)
  os.remove(os.path.join(_task_dir(str(tmp_path), name), 'provenance.json'))
  with pytest.raises(token_cache.StaleCacheError, match='no provenance.json'):
    token_cache.check_cache_provenance(name, str(tmp_path))


def test_existing_cache_is_skipped_refused_or_safely_replaced(cache_root, tmp_path, monkeypatch,
                                                                 capsys):
  root = str(tmp_path)
  # Up to date: skipped, nothing written.
  _copy_cache(cache_root, root, TASK)
  before = _digests(_task_dir(root))
  assert token_cache.cache_tasks([TASK], root, min_shards=1) == []
  assert _digests(_task_dir(root)) == before

  # Stale: refused without overwrite (and by the command, in one line, exit status 2).
  name = f'{TASK}_seed2'
  synthetic.register(name, synthetic.tokenizer(init_seed=2))
  _copy_cache(cache_root, root, name)
  old = _digests(_task_dir(root, name))
  with pytest.raises(token_cache.CacheExistsError, match='overwrite'):
    token_cache.cache_tasks([name], root, min_shards=1)
  gin.clear_config(clear_constants=False)
  rc = main.main(['tokenize', '--gin_file=runs/tokenize.gin', f"--gin.TASKS=['{name}']",
                  f"--gin.CACHE_DIR='{root}'"])
  gin.clear_config(clear_constants=False)
  err = capsys.readouterr().err
  assert rc == 2 and 'Traceback' not in err
  assert f"tokenize: Task '{name}' has a completed cache" in err and 'OVERWRITE' in err
  assert _digests(_task_dir(root, name)) == old

  # A run that fails midway (in the tokenizer, inside Beam) leaves the old cache as it was.
  def explode(self, audio):
    raise RuntimeError('tokenizer exploded')
  with monkeypatch.context() as m:
    m.setattr(FrozenTokenizer, '__call__', explode)
    with pytest.raises(Exception, match='tokenizer exploded'):
      token_cache.cache_tasks([name], root, min_shards=1, overwrite=True)
  assert _digests(_task_dir(root, name)) == old
  assert sorted(os.listdir(root)) == sorted([TASK, name])  # no temporary directories left

  # With overwrite, a run that succeeds replaces it.
  assert token_cache.cache_tasks([name], root, min_shards=1, splits=['validation'],
                                 overwrite=True) == [_task_dir(root, name)]
  assert token_cache.check_cache_provenance(name, root, split='validation')
  assert sorted(os.listdir(root)) == sorted([TASK, name])
  assert not any(f.startswith('train.') for f in os.listdir(_task_dir(root, name)))
