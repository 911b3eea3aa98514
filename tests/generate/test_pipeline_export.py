"""Exporting training runs into the pipeline's slim parts: parameters only, bfloat16 option."""
from __future__ import annotations

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.generate import export
from musiclm_jax.generate import pipeline as pipeline_lib
from musiclm_jax.train.checkpoints import Checkpointer
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.generate import tiny_pipeline as builder

STAGE_CONFIG = """
CROP_SECONDS = 1.0
MODEL = @StageModel()
MODEL/StageModel.spec = @coarse_stage_spec()
MODEL/StageModel.config = @TransformerConfig()
MODEL/StageModel.conditioning_dropout = 0.1
MODEL/StageModel.vocab_multiple = 8
MODEL/TransformerConfig.vocab_size = 0
MODEL/TransformerConfig.embed_dim = 32
MODEL/TransformerConfig.num_layers = 1
MODEL/TransformerConfig.num_heads = 2
MODEL/TransformerConfig.head_dim = 16
MODEL/TransformerConfig.mlp_dim = 64
""" + ''.join(f'TokenSizes.{k} = {v}\n' for k, v in builder.SIZES.items())

CODEC_CONFIG = """
MODEL = @CodecModel()
MODEL/CodecModel.generator = @SoundStream()
MODEL/CodecModel.discriminators = None
MODEL/CodecModel.ema_decay = 0.99
MODEL/CodecModel.eval_levels = (1, 4)
MODEL/SoundStream.channels = 4
MODEL/SoundStream.channel_mults = (1, 2, 2, 4)
MODEL/SoundStream.embedding_dim = 16
MODEL/SoundStream.num_levels = 4
MODEL/SoundStream.codebook_size = 32
SoundStream.kmeans_init = False
"""


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


def _fill(abstract, seed=0):
  """A train state of random numbers with `abstract`'s structure (nothing compiled)."""
  rng = np.random.default_rng(seed)

  def leaf(s):
    if jnp.issubdtype(s.dtype, jnp.floating):
      return rng.standard_normal(s.shape).astype(s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map(leaf, abstract)


def _write_run(run_dir, config, model, batch_spec, step=7):
  """A run directory as `musiclm-jax train` leaves it: config.gin and one checkpoint."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.gin'), 'w') as f:
    f.write(config)
  steps = StepFunctions(model, Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1]),
                        batch_spec)
  state = _fill(steps.abstract_state)
  state = state.replace(step=np.int32(step))
  checkpointer = Checkpointer(os.path.join(run_dir, 'checkpoints'), async_save=False, keep=None)
  checkpointer.save(step, state, {}, force=True)
  checkpointer.close()
  return state


def test_export_stage_keeps_the_parameters_only(tmp_path):
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  main.parse_gin([], [b.strip() for b in STAGE_CONFIG.strip().splitlines()])
  with gin.config_scope('MODEL'):
    model = StageModel()
  gin.clear_config(clear_constants=False)
  run = str(tmp_path / 'coarse_run')
  state = _write_run(run, STAGE_CONFIG, model, export._stage_batch_spec(model))  # pylint: disable=protected-access
  assert state.opt_state['model']  # the run holds optimizer moments ...
  out = export.export_stage(run, str(tmp_path / 'coarse'))
  record = export.read_stage_record(out)
  assert record['crop_seconds'] == 1.0 and record['stage'] == 'coarse'
  assert record['conditioning_dropout'] == 0.1 and record['source']['step'] == 7
  loaded, params, _ = export.load_stage_dir(out)
  assert loaded.spec == model.spec and loaded.config == model.config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params['model'])
  # ... the export only the parameters; bfloat16 halves them.
  half = export.export_stage(run, str(tmp_path / 'coarse_bf16'), params_dtype='bfloat16')
  full_bytes = export.describe_dir_size(os.path.join(out, 'variables'))
  half_bytes = export.describe_dir_size(os.path.join(half, 'variables'))
  assert half_bytes < 0.75 * full_bytes, (half_bytes, full_bytes)
  _, half_params, _ = export.load_stage_dir(half)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(
          a, np.asarray(b).astype(jnp.bfloat16).astype(np.float32)),
      half_params, state.params['model'])
  with pytest.raises(FileExistsError):
    export.export_stage(run, out)
  with pytest.raises(FileNotFoundError, match='not a stage run directory'):
    export.export_stage(str(tmp_path), str(tmp_path / 'x'))


def test_export_codec_keeps_the_ema_generator_and_codebooks(tmp_path):
  from musiclm_jax.codec.model import CodecModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.codec.soundstream import SoundStream  # pylint: disable=g-import-not-at-top
  generator = SoundStream(channels=4, channel_mults=(1, 2, 2, 4), embedding_dim=16,
                          num_levels=4, codebook_size=32, kmeans_init=False)
  model = CodecModel(generator, ema_decay=0.99, eval_levels=(1, 4))
  run = str(tmp_path / 'codec_run')
  state = _write_run(run, CODEC_CONFIG, model,
                     {'audio': jax.ShapeDtypeStruct((8, 480), jnp.float32)})
  out = export.export_codec(run, str(tmp_path / 'codec'))
  record = export.read_codec_record(out)
  assert record['source'] == {'run_dir': run, 'step': 7, 'ema': True}
  assert (record['num_levels'], record['codebook_size'], record['hop_length']) == (4, 32, 480)
  rebuilt, variables = export.load_codec_dir(out)
  assert rebuilt == generator
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables['params'],
                         state.model_state['ema_generator'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables['quantizer_state'],
                         state.model_state['quantizer_state'])


def test_assemble_exports_runs_in_place_of_exported_parts(tiny_pipeline, tmp_path):
  """A stage run given to assemble_pipeline is exported into the folder."""
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  _, parts = tiny_pipeline
  main.parse_gin([], [b.strip() for b in STAGE_CONFIG.strip().splitlines()])
  with gin.config_scope('MODEL'):
    model = StageModel()
  gin.clear_config(clear_constants=False)
  run = str(tmp_path / 'coarse_run')
  state = _write_run(run, STAGE_CONFIG, model, export._stage_batch_spec(model))  # pylint: disable=protected-access
  folder = pipeline_lib.assemble_pipeline(str(tmp_path / 'p'),
                                          **dict(parts, coarse_stage_dir=run))
  _, params, record = export.load_stage_dir(os.path.join(folder, 'coarse_stage'))
  assert record['source']['run_dir'] == run
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params['model'])
  sampling = pipeline_lib.read_pipeline_record(folder)['sampling']['coarse']
  assert sampling['window_seconds'] == 1.0 and sampling['stride_seconds'] == 0.48
