"""Stage data: the frozen tokenizers, one token cache read by every stage, training from gin."""
from __future__ import annotations

import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from musiclm_jax import main
from musiclm_jax.codec.soundstream import SoundStream
from musiclm_jax.data import token_cache
from musiclm_jax.data.seqio_input import DatasetConfig, get_host_dataset
from musiclm_jax.mulan import conditioning
from musiclm_jax.stages import data as stage_data
from musiclm_jax.stages import spec as spec_lib
from musiclm_jax.stages import tokens as stage_tokens
from musiclm_jax.train.checkpoints import Checkpointer
from musiclm_jax.train.train_state import TrainState
from tests.stages import stage_tokens_task as test_task

SIZES = test_task.TEST_SIZES
TASK = test_task.TASK


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


# ------------------------------------------------------------------ frozen tokenizers


def _tiny_conditioner(window=4800, hop=2400, levels=3, codes=4):
  from musiclm_jax.audio.features import LogMelFrontEnd  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.audio import ResNetAudioTower  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.model import MuLan  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.text import BertEncoder  # pylint: disable=g-import-not-at-top
  network = MuLan(audio_tower=ResNetAudioTower.tiny(front_end=LogMelFrontEnd(n_mels=16),
                                                    stage_widths=(8, 16), num_groups=2),
                  text_tower=BertEncoder(hidden=16, layers=1, heads=2, mlp=32, max_positions=32,
                                         pooler=False),
                  embed_dim=8)
  params = network.init(jax.random.key(0), jnp.zeros((1, window)), jnp.zeros((1, 8), jnp.int32),
                        jnp.ones((1, 8), jnp.int32))['params']
  cond = conditioning.MuLanConditioner(network, params, np.zeros((levels, 1, 8)), window, hop,
                                       text_length=16)
  audio = np.random.default_rng(0).uniform(-0.5, 0.5, size=(24, window)).astype(np.float32)
  cond.codebooks, _ = conditioning.fit_rvq(cond.embed_audio(audio), levels, codes, num_iters=10)
  return cond


def test_mulan_tokenizer_equals_the_conditioners_audio_tokens(tmp_path):
  cond = _tiny_conditioner()
  path = conditioning.save_conditioner(str(tmp_path / 'cond'), cond)
  samples = 3 * cond.window_samples  # several windows, averaged
  tok = stage_tokens.mulan_tokenizer(path, samples, batch_size=2)
  wav = np.random.default_rng(2).uniform(-0.5, 0.5, (3, samples)).astype(np.float32)
  tokens = tok(wav)
  assert tokens.shape == (3, 3) and tok.output_spec().shape == (3,)
  np.testing.assert_array_equal(tokens, cond.audio_tokens(wav))
  assert tok.provenance()['weights']['layout'] == 'pytree'


def test_codec_tokenizer_equals_soundstream_encode_of_the_run(tmp_path):
  run = tmp_path / 'codec_run'
  run.mkdir()
  (run / 'config.gin').write_text(
      "MODEL = @CodecModel()\nMODEL/CodecModel.generator = @SoundStream()\n"
      'MODEL/CodecModel.ema_decay = None\nMODEL/SoundStream.channels = 4\n'
      'MODEL/SoundStream.channel_mults = (1, 2, 2, 4)\nMODEL/SoundStream.embedding_dim = 16\n'
      'MODEL/SoundStream.num_levels = 3\nMODEL/SoundStream.codebook_size = 32\n'
      'MODEL/SoundStream.name = None\nSoundStream.kmeans_init = False\n')
  model = SoundStream(channels=4, channel_mults=(1, 2, 2, 4), embedding_dim=16, num_levels=3,
                      codebook_size=32, kmeans_init=False)
  wav = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 2400)).astype(np.float32)
  variables = jax.device_get(nn.meta.unbox(model.init(jax.random.PRNGKey(1), wav, train=False)))
  zero = np.zeros((), np.int32)
  ckpt = Checkpointer(str(run / 'checkpoints'), async_save=False, keep=None)
  ckpt.save(7, TrainState(step=np.int32(7), params={'generator': variables['params']},
                          opt_state={}, model_state={'quantizer_state':
                                                     variables['quantizer_state']},
                          rng=np.zeros(2, np.uint32), skipped_in_a_row=zero,
                          skipped_total=zero), {}, force=True)
  ckpt.close()
  rebuilt, ema = stage_tokens.codec_from_run(str(run))
  assert rebuilt == model and not ema
  tok = stage_tokens.codec_tokenizer(str(run), 2400, batch_size=2)
  expected = model.apply(variables, wav, method=SoundStream.encode)
  codes = tok(wav)
  assert codes.shape == (2, 5, 3)
  np.testing.assert_array_equal(codes, np.asarray(expected))
  assert tok.provenance()['weights']['step'] == 7


def test_stage_tokenizers_name_a_missing_model_directory(tmp_path, monkeypatch):
  monkeypatch.setenv(stage_tokens.ENV_CODEC_DIR, str(tmp_path / 'no_codec'))
  holder = stage_tokens.StageTokenizers(2.0, semantic_tokenizer_dir=str(tmp_path),
                                        mulan_conditioner_dir=str(tmp_path))
  assert holder.output_ranks() == {'semantic_tokens': 1, 'codec_tokens': 2, 'mulan_tokens': 1}
  assert holder.resolved_dirs()['codec_dir'] == str(tmp_path / 'no_codec')
  with pytest.raises(FileNotFoundError) as e:
    holder.frozen_tokenizers()
  message = str(e.value)
  assert 'no_codec' in message and 'stage_token_model_dirs.codec_dir' in message
  assert '$MUSICLM_JAX_CODEC_DIR' in message
  gin.bind_parameter('stage_token_model_dirs.codec_dir', '/elsewhere')
  assert holder.resolved_dirs()['codec_dir'] == '/elsewhere'


# ------------------------------------------------------------------ the cache and the stages


@pytest.fixture(scope='module')
def cache_root(tmp_path_factory, tiny_corpus_dir):
  """`musiclm-jax tokenize` of test_stage_tokens (2 s crops of embedded_music/tiny)."""
  root = str(tmp_path_factory.mktemp('stage_tokens'))
  gin.clear_config(clear_constants=False)
  try:
    rc = main.main(['tokenize', '--gin_file=runs/tokenize.gin', f"--gin.TASKS=['{TASK}']",
                    f"--gin.CACHE_DIR='{root}'", f"--gin.TFDS_DATA_DIR='{tiny_corpus_dir}'",
                    "--gin.TASK_MODULES=['tests.stages.stage_tokens_task']",
                    '--gin.MIN_SHARDS=2'])
  finally:
    gin.clear_config(clear_constants=False)
  assert rc == 0
  return root


def _cached(split):
  """The cached examples (computed as the cache computed them), in source order."""
  return list(token_cache.precache_examples(TASK, split))


def _batches(name, lengths, cache_root, split='validation', pack=False, batch_size=2):
  config = DatasetConfig(name, lengths, split=split, batch_size=batch_size, shuffle=False,
                         cache_dir=cache_root, feature_converter='prefix_lm', pack=pack)
  return list(get_host_dataset(config, num_epochs=1, drop_remainder=False).as_numpy_iterator())


def test_every_stage_reads_aligned_crops_from_the_one_cache(cache_root):
  record = token_cache.check_cache_provenance(TASK, cache_root)
  assert [t['output_feature'] for t in record['tokenizers']] == [
      'semantic_tokens', 'codec_tokens', 'mulan_tokens']
  cached = _cached('validation')
  assert cached[0]['semantic_tokens'].shape == (50,)
  assert cached[0]['codec_tokens'].shape == (100, 3)
  assert cached[0]['mulan_tokens'].shape == (1, 2) and 'audio' not in cached[0]
  for stage in ('semantic', 'coarse', 'fine'):
    spec = spec_lib.STAGE_SPECS[stage](SIZES)
    name = stage_data.stage_task(TASK, spec, module=None)
    assert name == f'{TASK}_{stage}'
    lengths = spec.feature_lengths(1.0)  # half of each 2 s cached clip
    n_in, n_out = lengths['inputs'], lengths['targets']
    (batch,) = _batches(name, lengths, cache_root)
    targets = batch['decoder_target_tokens']
    assert targets.shape == (2, n_in + n_out)
    # The PrefixLM layout the model expects: BOS 0 then the shifted sequence; loss on targets.
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:], targets[:, :-1])
    assert (batch['decoder_input_tokens'][:, 0] == 0).all()
    np.testing.assert_array_equal(batch['decoder_loss_weights'],
                                  np.repeat([[0] * n_in + [1] * n_out], 2, 0))
    unit = spec.crop_unit_samples  # crops start at whole units: 960 samples, 480 for 'fine'
    for row in targets:
      # Some crop offset of some cached clip gives exactly this example.
      matches = []
      for ex in cached:
        for k in range(0, 24000 // unit + 1):
          s, c = k * unit // 960, k * unit // 480  # the offset in semantic and codec frames
          streams = {'mulan': ex['mulan_tokens'][None],
                     'semantic': ex['semantic_tokens'][None, s:s + 25],
                     'coarse': ex['codec_tokens'][None, c:c + 50, :1],
                     'fine': ex['codec_tokens'][None, c:c + 50, 1:]}
          tokens, _ = spec.flatten({s.name: streams[s.name] for s in spec.streams})
          if np.array_equal(tokens[0], row):
            matches.append(k)
      assert matches, stage


def test_packing_gives_the_same_loss_as_padding(cache_root):
  """Two examples per packed row (T5X segment ids): the summed loss equals the unpacked one."""
  from musiclm_jax.nn.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  spec = spec_lib.coarse_stage_spec(SIZES)
  name = stage_data.stage_task(TASK, spec, crop_seconds=1.0, module=None)
  assert name == f'{TASK}_coarse_1000ms'
  lengths = spec.feature_lengths(1.0)
  (padded,) = _batches(name, lengths, cache_root, split='train', batch_size=12)
  packed_lengths = spec_lib.stage_feature_lengths(spec, 1.0, examples_per_row=2)
  assert packed_lengths == {'inputs': 2 * lengths['inputs'], 'targets': 2 * lengths['targets']}
  packed = _batches(name, packed_lengths, cache_root, split='train', pack=True, batch_size=6)[0]
  assert packed['decoder_segment_ids'].max() == 2
  model = StageModel(spec, TransformerConfig(vocab_size=0, embed_dim=16, num_layers=1,
                                             num_heads=2, head_dim=8, mlp_dim=32),
                     vocab_multiple=8, eval_unconditional=False)
  params = {'model': model.module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
            ['params']}
  a = jax.device_get(model.eval_metrics(params, {}, padded))
  b = jax.device_get(model.eval_metrics(params, {}, packed))
  assert a['loss'][1] == b['loss'][1] == 12 * lengths['targets']
  np.testing.assert_allclose(a['loss'][0], b['loss'][0], rtol=1e-4)


def test_a_spec_that_does_not_match_the_cache_fails_naming_the_stream(cache_root, tmp_path):
  small = spec_lib.coarse_stage_spec(spec_lib.TokenSizes(
      semantic_codes=4, codec_levels=3, codec_codes=32, coarse_levels=1, mulan_levels=2,
      mulan_codes=8), name='too_small')
  name = stage_data.stage_task(TASK, small, module=None)
  with pytest.raises(Exception, match=r"stream .{1,3}semantic.*codebook_size 4"):
    _batches(name, small.feature_lengths(1.0), cache_root)
  with pytest.raises(ValueError, match=r"'inputs'\]=3 cannot hold the 27 prefix tokens"):
    _batches(name, {'inputs': 3, 'targets': 50}, cache_root)
  with pytest.raises(ValueError, match='not a positive multiple of 960 samples'):
    _batches(name, {'inputs': 27, 'targets': 51}, cache_root)
  with pytest.raises(ValueError, match='already registered with another stage spec'):
    stage_data.register_stage_task(TASK, spec_lib.coarse_stage_spec(SIZES), name=name)
  # No cache under this root (and none registered with SeqIO for this task name).
  stage_data.register_stage_tokens_task('test_stage_tokens_uncached', 'embedded_music/tiny:1.1.0',
                                        test_task.tokenizers(), clip_seconds=2.0,
                                        splits=('train', 'validation'))
  uncached = stage_data.stage_task('test_stage_tokens_uncached', small, module=None)
  with pytest.raises(token_cache.MissingCacheError, match='test_stage_tokens_uncached'):
    _batches(uncached, small.feature_lengths(1.0), str(tmp_path))


def test_a_tiny_stage_trains_from_gin_and_the_loss_falls(cache_root, tmp_path):
  from tests.stages import stage_hooks  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / 'coarse'
  rc = main.main([
      'train', '--gin_file=examples/coarse_stage_tiny_cpu.gin',
      '--module_import=tests.stages.stage_tokens_task', '--module_import=tests.stages.stage_hooks',
      f"--gin.MODEL_DIR='{model_dir}'", f"--gin.CACHE_DIR='{cache_root}'",
      f"--gin.TOKENS_TASK='{TASK}'", '--gin.CROP_SECONDS=1.0', '--gin.TRAIN_STEPS=40',
      '--gin.BATCH_SIZE=8', '--gin.train.eval_every_steps=40', '--gin.train.eval_batches=1',
      '--gin.train.checkpoint_every_steps=40', '--gin.train.log_every_steps=20',
      '--gin.train.progress_bar=False', '--gin.train.step_hooks=[@record_stage_losses()]',
      '--gin.TransformerConfig.num_layers=1', '--gin.TransformerConfig.embed_dim=32',
      '--gin.TransformerConfig.mlp_dim=64', '--gin.TransformerConfig.head_dim=8',
      '--gin.OptimizerConfig.learning_rate=1e-2', '--gin.OptimizerConfig.warmup_steps=5',
      *[f'--gin.{b}' for b in test_task.TEST_SIZE_BINDINGS]])
  assert rc == 0
  losses = [stage_hooks.LOSSES[s] for s in sorted(stage_hooks.LOSSES)]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  config = (model_dir / 'config.gin').read_text()
  assert 'StageModel.spec = %STAGE_SPEC' in config and f"TOKENS_TASK = '{TASK}'" in config
  assert os.listdir(model_dir / 'eval') and os.listdir(model_dir / 'checkpoints')
  assert seqio.TaskRegistry.get(f'{TASK}_coarse_1000ms') is not None
