"""Melody stage tokens: cached as sampling computes them, read and trained by the semantic stage."""
from __future__ import annotations

import dataclasses
import os

import gin
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from musiclm_jax import main
from musiclm_jax.data import preprocessors, token_cache
from musiclm_jax.data.seqio_input import DatasetConfig, get_host_dataset
from musiclm_jax.stages import data as stage_data
from musiclm_jax.stages import spec as spec_lib
from musiclm_jax.stages import tokens as stage_tokens
from tests.stages import stage_tokens_task as test_task

TASK = 'test_melody_stage_tokens'
CLIP_SECONDS = 4.0  # embedded_music/tiny's whole clips: each cached crop is its clip
CLIP_SAMPLES = 96000
CROP_SECONDS = 2.0  # the semantic stage's crop: the first half of each clip
# The stand-ins' sizes plus the tiny pipeline's melody conditioner (tests/generate/tiny_pipeline:
# 2 levels x 4 codes, 1 s windows every 0.5 s: 7 windows per 4 s clip).
SIZES = dataclasses.replace(test_task.TEST_SIZES, melody_levels=2, melody_codes=4,
                            melody_frames=7)
SIZE_BINDINGS = [f'TokenSizes.{k}={v}' for k, v in vars(SIZES).items()]
MELODY_BINDINGS = 'TokenSizes.melody_levels / melody_codes / melody_frames'


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


@pytest.fixture(scope='module')
def parts(tmp_path_factory):
  """The tiny pipeline's random parts (its melody conditioner makes the melody tokens)."""
  from tests.generate import tiny_pipeline  # pylint: disable=g-import-not-at-top
  return tiny_pipeline.build_parts(str(tmp_path_factory.mktemp('melody_parts')))


@pytest.fixture(scope='module')
def cache_root(tmp_path_factory, tiny_corpus_dir, parts):
  """A cache of 4 s embedded_music/tiny clips: the stand-ins' tokens and real melody tokens."""
  root = str(tmp_path_factory.mktemp('melody_stage_tokens'))
  tokenizers = test_task.tokenizers(CLIP_SAMPLES) + [
      stage_tokens.melody_tokenizer(parts['melody_conditioner_dir'], CLIP_SAMPLES)]
  if TASK in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(TASK)
  stage_data.register_stage_tokens_task(TASK, 'embedded_music/tiny:1.1.0', tokenizers,
                                        clip_seconds=CLIP_SECONDS,
                                        splits=('train', 'validation'))
  token_cache.cache_tasks([TASK], root, min_shards=1, tfds_data_dir=tiny_corpus_dir)
  seqio.add_global_cache_dirs([root])
  return root


def _cached(split):
  """The cache's examples, read as a stage task reads them (its provenance checked first)."""
  source = stage_data.CachedTokensSource(TASK, (split,))
  return list(source.get_dataset(split, shuffle=False).as_numpy_iterator())


def _clips(split):
  """{id: float32 audio} of the corpus's clips (4 s each, so each is its own cached crop)."""
  ds = preprocessors.audio_to_float(seqio.TaskRegistry.get(TASK).source.get_dataset(
      split=split, shuffle=False))
  return {ex['id']: ex['audio'] for ex in ds.as_numpy_iterator()}


def _batches(name, lengths, cache_root, split='validation'):
  config = DatasetConfig(name, lengths, split=split, batch_size=2, shuffle=False,
                         cache_dir=cache_root, feature_converter='prefix_lm')
  return list(get_host_dataset(config, num_epochs=1, drop_remainder=False).as_numpy_iterator())


def test_cached_melody_tokens_are_the_clips_own(cache_root, parts):
  from musiclm_jax.melody.conditioning import load_melody_conditioner  # pylint: disable=g-import-not-at-top
  record = token_cache.check_cache_provenance(TASK, cache_root)
  melody = record['tokenizers'][-1]
  assert melody['output_feature'] == 'melody_tokens' and melody['output']['shape'] == [7, 2]
  cached, clips = _cached('validation'), _clips('validation')
  assert len(cached) == len(clips) == 2
  conditioner = load_melody_conditioner(parts['melody_conditioner_dir'])
  for ex in cached:
    tokens = ex['melody_tokens']
    assert tokens.shape == (7, 2) and tokens.dtype == np.int32
    assert 0 <= tokens.min() and tokens.max() < 4
    audio = clips[ex['id']]
    assert audio.shape == (CLIP_SAMPLES,)
    np.testing.assert_array_equal(tokens, conditioner.tokens(audio))


def test_the_semantic_stage_trains_on_them_and_samples_with_the_same_tokens(
    cache_root, parts, tmp_path):
  """Cache -> stage examples -> 2 training steps -> pipeline: one melody layout throughout."""
  from musiclm_jax.evaluation.pipeline_eval import stage_sequences  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.pipeline import Pipeline, assemble_pipeline  # pylint: disable=g-import-not-at-top
  spec = spec_lib.semantic_stage_spec(SIZES)
  assert [s.name for s in spec.conditions] == ['mulan', 'melody']
  cached, clips = _cached('validation'), _clips('validation')

  # The stage task's examples: the clip's first CROP_SECONDS (melody tokens describe the clip
  # from its start), with the clip's MuLan and melody tokens as the prefix.
  name = stage_data.stage_task(TASK, spec, crop_seconds=CROP_SECONDS, module=None)
  lengths = spec.feature_lengths(CROP_SECONDS)
  assert lengths == {'inputs': 2 + 7 * 2, 'targets': 50}
  (batch,) = _batches(name, lengths, cache_root)
  expected = {ex['id']: np.asarray(spec.flatten(
      {'mulan': ex['mulan_tokens'], 'melody': ex['melody_tokens'][None],
       'semantic': ex['semantic_tokens'][None, :50]})[0][0]) for ex in cached}
  rows = [r.tolist() for r in batch['decoder_target_tokens']]
  assert sorted(rows) == sorted(e.tolist() for e in expected.values())

  model_dir = tmp_path / 'semantic'
  rc = main.main([
      'train', '--gin_file=examples/semantic_stage_tiny_cpu.gin',
      f"--gin.MODEL_DIR='{model_dir}'", f"--gin.CACHE_DIR='{cache_root}'",
      f"--gin.TOKENS_TASK='{TASK}'", f'--gin.CROP_SECONDS={CROP_SECONDS}',
      '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=8', '--gin.train.eval_every_steps=2',
      '--gin.train.eval_batches=1', '--gin.train.checkpoint_every_steps=2',
      '--gin.train.log_every_steps=1', '--gin.train.progress_bar=False',
      '--gin.TransformerConfig.num_layers=1', '--gin.TransformerConfig.embed_dim=16',
      '--gin.TransformerConfig.mlp_dim=32', '--gin.TransformerConfig.num_heads=2',
      '--gin.TransformerConfig.head_dim=8', *[f'--gin.{b}' for b in SIZE_BINDINGS]])
  assert rc == 0 and os.listdir(model_dir / 'checkpoints')

  # assemble_pipeline checks the stage's melody stream against the melody conditioner.
  folder = assemble_pipeline(
      str(tmp_path / 'pipeline'), semantic_stage_dir=str(model_dir),
      **{k: v for k, v in parts.items() if k != 'semantic_stage_dir'})
  pipeline = Pipeline.load(folder)
  assert pipeline.has_melody
  melody_tokens_fn = pipeline._melody_tokens_fn  # pylint: disable=protected-access
  for ex in cached:
    audio = clips[ex['id']]
    # Sampling with this clip as the hummed tune conditions the first window on the cached tokens.
    np.testing.assert_array_equal(melody_tokens_fn(audio)(0), ex['melody_tokens'])
    # The evaluation lays the clip's first window out as the training example.
    tokens, _ = stage_sequences(pipeline, 'semantic', audio[None], ex['semantic_tokens'][None],
                                np.zeros((1, 200, 4), np.int32), ex['mulan_tokens'].reshape(1, -1))
    np.testing.assert_array_equal(tokens[0], expected[ex['id']])


def test_melody_sizes_unlike_the_conditioners_fail_naming_the_bindings(cache_root, parts,
                                                                        tmp_path):
  from musiclm_jax.generate import export  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.pipeline import PipelineError, assemble_pipeline  # pylint: disable=g-import-not-at-top
  from musiclm_jax.nn.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  from tests.generate.tiny_pipeline import random_variables  # pylint: disable=g-import-not-at-top
  for field, value, message in (('melody_frames', 3, 'expects 3 frame'),
                                ('melody_levels', 1, 'uses 1 level')):
    bad = spec_lib.semantic_stage_spec(dataclasses.replace(SIZES, **{field: value}),
                                       name=f'semantic_{field}')
    name = stage_data.stage_task(TASK, bad, crop_seconds=CROP_SECONDS, module=None)
    # TensorFlow's assertion message escapes the quotes around the stream's name.
    with pytest.raises(Exception, match=rf'stream .{{1,3}}melody.*{message}.*{MELODY_BINDINGS}'):
      _batches(name, bad.feature_lengths(CROP_SECONDS), cache_root)
  # A stage trained with another codebook size than the melody conditioner's is refused.
  bad = spec_lib.semantic_stage_spec(dataclasses.replace(SIZES, melody_codes=5))
  model = StageModel(bad, TransformerConfig(vocab_size=0, embed_dim=16, num_layers=1,
                                            num_heads=2, head_dim=8, mlp_dim=32),
                     vocab_multiple=8)
  params = random_variables(model.module, jnp.zeros((1, 8), jnp.int32))['params']
  stage_dir = export.save_stage(str(tmp_path / 'bad_stage'), model, params,
                                crop_seconds=CROP_SECONDS)
  with pytest.raises(PipelineError, match=r"'melody'.*codebook_size 5, but the melody "
                     'conditioner has 4'):
    assemble_pipeline(str(tmp_path / 'pipeline'), semantic_stage_dir=stage_dir,
                      **{k: v for k, v in parts.items() if k != 'semantic_stage_dir'})


def test_the_melody_tasks_add_melody_tokens_and_leave_the_others_unchanged(monkeypatch,
                                                                           tmp_path):
  import tasks.stages  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  for key, (_, env) in stage_tokens.DEFAULT_DIRS.items():
    monkeypatch.setenv(env, str(tmp_path / ('no_melody' if key.startswith('melody') else '')))

  def holder(task):
    (tokenize,) = [p for p in task.preprocessors
                   if getattr(p, 'func', None) is stage_data.tokenize_streams]
    return tokenize.keywords['tokenizers']

  for name, clip_seconds in (('embedded_music_melody_stage_tokens', 10.0),
                             ('embedded_music_tiny_melody_stage_tokens', 4.0)):
    task = seqio.TaskRegistry.get(name)
    assert task.output_features['melody_tokens'].rank == 2
    assert set(task.splits) == {'train', 'validation', 'test'}
    tokenizers = holder(task)
    assert tokenizers.melody and tokenizers.clip_seconds == clip_seconds
    assert tokenizers.output_ranks()['melody_tokens'] == 2
    with pytest.raises(FileNotFoundError, match='no_melody.*stage_token_model_dirs.melody_'
                       'conditioner_dir.*MUSICLM_JAX_MELODY_CONDITIONER_DIR'):
      tokenizers.frozen_tokenizers()
  for name in ('embedded_music_stage_tokens', 'embedded_music_tiny_stage_tokens',
               'musiccaps_stage_tokens'):
    task = seqio.TaskRegistry.get(name)
    tokenizers = holder(task)
    assert 'melody_tokens' not in task.output_features and not tokenizers.melody
    assert sorted(tokenizers.dirs) == ['codec_dir', 'mulan_conditioner_dir',
                                       'semantic_tokenizer_dir']


def test_the_gin_examples_bind_the_melody_conditioners_sizes():
  main.parse_gin(['examples/tokenize_melody_stage_tokens_tiny_cpu.gin'],
                 ["CACHE_DIR = '/tmp/unused'"])
  assert stage_tokens.stage_token_model_dirs() == {
      'semantic_tokenizer_dir': 'runs/semantic_tokenizer_tiny', 'codec_dir': 'runs/codec_tiny',
      'mulan_conditioner_dir': 'runs/mulan_conditioner_tiny',
      'melody_conditioner_dir': 'runs/melody_conditioner_tiny'}
  assert gin.query_parameter('%TASKS') == ['embedded_music_melody_stage_tokens']
  gin.clear_config(clear_constants=False)
  # The tiny melody conditioner's sizes (24 levels x 64 codes, 3 windows per 10 s clip), as
  # runs/train_semantic_stage.gin says to bind them.
  main.parse_gin(['examples/semantic_stage_tiny_cpu.gin'], [
      "MODEL_DIR = '/tmp/unused'", "TOKENS_TASK = 'embedded_music_melody_stage_tokens'",
      'TokenSizes.melody_levels = 24', 'TokenSizes.melody_codes = 64',
      'TokenSizes.melody_frames = 3'])
  spec = spec_lib.semantic_stage_spec()  # pylint: disable=no-value-for-parameter
  melody = spec.stream('melody')
  assert (melody.num_levels, melody.codebook_size, melody.frames) == (24, 64, 3)
  lengths = spec_lib.stage_feature_lengths()  # pylint: disable=no-value-for-parameter
  assert lengths == {'inputs': 12 + 3 * 24, 'targets': 250}
  if os.path.isdir('runs/melody_conditioner_tiny'):  # trained locally (not in a fresh checkout)
    tokenizer = stage_tokens.melody_tokenizer('runs/melody_conditioner_tiny', 10 * 24000)
    assert tokenizer.output_spec().shape == (3, 24)
    assert tokenizer.model.codebook_size == 64
