"""The pipeline sampling on a device mesh (8 simulated CPU devices) equals one device.

One short generation per mesh (1 s, two prompts, guidance on the semantic and coarse stages):
the semantic stage greedy, the coarse and fine stages sampled, so one run covers both kinds of
decode, the one-window decodes (`decode`) and the fine stage's batched chunks
(`decode_chunks`). The batch of 2 is padded to the data-parallel size (8 or 4) and the padding
dropped.

Tokens are compared exactly, the sampled ones too: each row keeps its own PRNG key (draws do not
depend on the mesh or on the padding rows; musiclm_jax/generate/decoding.py), so they could
only differ through last-bit rounding of a sharded forward pass flipping a draw at a near tie,
which does not happen here (as in tests/generate/test_decoding.py::test_eight_devices_equal_one;
if an XLA change ever makes it, such a flip would show as a handful of differing tokens, not a
wholesale mismatch).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import soundfile as sf
from jax.sharding import PartitionSpec as P

from musiclm_jax import main
from musiclm_jax.generate import pipeline as pipeline_lib
from musiclm_jax.train.partitioning import Partitioner

PROMPTS = ['a calm piano melody', 'fast drums']
SECONDS = 1.0  # semantic and coarse: one window each; fine: two 0.5 s chunks decoded together
TEMPERATURES = (0.0, 0.95, 0.4)  # semantic greedy; coarse and fine sampled
SEED = 11


def _generate(pipe, prompts=PROMPTS, num_samples=1, progress=False):
  return pipe.generate_tokens(prompts, SECONDS, seed=SEED, temperatures=TEMPERATURES,
                              num_samples=num_samples, progress=progress)


def _assert_same_generation(got, want):
  np.testing.assert_array_equal(got.semantic_tokens, want.semantic_tokens)
  np.testing.assert_array_equal(got.codec_tokens, want.codec_tokens)
  np.testing.assert_array_equal(got.audio, want.audio)
  assert [(r.stage, r.window, r.steps, r.batched) for r in got.windows] == [
      (r.stage, r.window, r.steps, r.batched) for r in want.windows]
  for g, w in zip(got.windows, want.windows):  # the records hold the real rows only
    np.testing.assert_array_equal(g.prompt, w.prompt)


@pytest.fixture(scope='module')
def reference(pipeline):
  """One device's generation (the session's unsharded pipeline)."""
  assert pipeline.partitioner is None
  result = _generate(pipeline)
  assert any(r.batched for r in result.windows)  # decode_chunks is exercised
  assert result.semantic_tokens.shape[0] == 2
  return result


def test_data_parallel_mesh_pads_the_batch_and_equals_one_device(tiny_pipeline, reference):
  pipe = pipeline_lib.load_pipeline(tiny_pipeline[0], mesh_shape=(-1, 1, 1))
  assert pipe.partitioner.mesh_shape == {'data': 8, 'fsdp': 1, 'model': 1}
  assert pipe._padded_rows(2) == 8  # pylint: disable=protected-access
  assert 'mesh data 8 x fsdp 1 x model 1' in pipe.describe()
  _assert_same_generation(_generate(pipe), reference)


def test_tensor_and_fsdp_parallel_mesh_with_progress_equals_one_device(tiny_pipeline, reference,
                                                                      capsys):
  """Heads / MLP / vocabulary over 'model', embed over 'fsdp'; with progress bars, so the
  decodes run in chunks (start_decode + decode_steps) rather than in one call."""
  partitioner = Partitioner(mesh_shape=(2, 2, 2))
  pipe = pipeline_lib.Pipeline.load(tiny_pipeline[0], partitioner)
  assert pipe.partitioner is partitioner
  assert pipe._padded_rows(2) == 4  # pylint: disable=protected-access
  # The stage parameters are sharded by their logical axes: heads over 'model', embed 'fsdp'.
  query = pipe.stages['coarse'].params['layers_0']['self_attention']['query']['kernel']
  assert query.sharding.spec == P('fsdp', 'model', None)
  embed, heads, head_dim = query.shape
  assert {s.data.shape for s in query.addressable_shards} == {(embed // 2, heads // 2, head_dim)}
  _assert_same_generation(_generate(pipe, progress=True), reference)
  assert 'fine: 100%' in capsys.readouterr().err


def test_auto_mesh_takes_the_widest_model_axis_the_stages_allow(tiny_pipeline):
  # The tiny stages have 2 heads: 'model' can be 2 of the 8 devices, the other 4 split the batch.
  pipe = pipeline_lib.Pipeline.load(tiny_pipeline[0], mesh_shape='auto')
  assert pipe.partitioner.mesh_shape == {'data': 4, 'fsdp': 1, 'model': 2}
  query = pipe.stages['semantic'].params['layers_0']['self_attention']['query']['kernel']
  assert query.sharding.spec == P('fsdp', 'model', None)
  abstract = [pipeline_lib.abstract_stage_params(s.model) for s in pipe.stages.values()]
  assert pipeline_lib.auto_mesh_shape(abstract, num_devices=1) == (1, 1, 1)
  assert pipeline_lib.auto_mesh_shape(abstract, num_devices=6) == (3, 1, 2)


def test_mesh_errors_are_clear(tiny_pipeline):
  folder = tiny_pipeline[0]
  with pytest.raises(pipeline_lib.PipelineError,
                     match=r"the semantic stage cannot be split over the mesh \(1, 1, 8\) "
                     r"\(data,fsdp,model\): .*\('heads', 2\) over model = 8 devices"):
    pipeline_lib.Pipeline.load(folder, mesh_shape='1,1,8')
  with pytest.raises(ValueError, match='not both'):
    pipeline_lib.Pipeline.load(folder, Partitioner(), mesh_shape=(-1, 1, 1))
  for bad in ('1,x,1', (1, 1), (-1, -1, 1), (0, 1, 1)):
    with pytest.raises(ValueError, match='mesh_shape'):
      pipeline_lib.Pipeline.load(folder, mesh_shape=bad)
  with pytest.raises(ValueError, match=r'needs 16 devices, only 8 exist'):
    pipeline_lib.Pipeline.load(folder, mesh_shape=(16, 1, 1))
  assert pipeline_lib.parse_mesh_shape(' Auto ') == 'auto'
  assert pipeline_lib.parse_mesh_shape('1,-1,1') == (1, -1, 1)
  assert pipeline_lib.parse_mesh_shape(None) is None


def test_sample_cli_mesh_shape(pipeline, tiny_pipeline, tmp_path, capsys):
  """`--mesh_shape` (the data-parallel mesh above: its decodes are compiled already)."""
  out = tmp_path / 'mesh.wav'
  rc = main.main(['sample', '--checkpoint', tiny_pipeline[0], '--prompt', PROMPTS[0],
                  '--seconds', str(SECONDS), '--batch', '2', '--seed', str(SEED),
                  '--temperatures', ','.join(map(str, TEMPERATURES)), '--mesh_shape=-1,1,1',
                  '--out', str(out), '--no_progress'])
  assert rc == 0, capsys.readouterr().err
  want = _generate(pipeline, PROMPTS[0], num_samples=2).audio
  for i in range(2):
    audio, _ = sf.read(str(tmp_path / f'mesh-{i + 1}.wav'), dtype='float32')
    # The wav is 16-bit: equal up to the quantisation step.
    np.testing.assert_allclose(audio, want[i], rtol=0, atol=1.5 / 32768)
  rc = main.main(['sample', '--checkpoint', tiny_pipeline[0], '--prompt', 'piano',
                  '--mesh_shape', '2,x', '--out', str(out), '--no_progress'])
  assert rc == 2
  assert "error: mesh_shape '2,x': expected 'auto' or 3 comma-separated" in capsys.readouterr().err
  assert jax.device_count() == 8
