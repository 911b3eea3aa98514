"""FAD embedders beside musicnn (SavedModels, MuLan), their selection in evaluate_pipeline, and
the training curves (eval metrics over checkpoints) in the report."""
from __future__ import annotations

import os
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.common.tf_setup import quiet_tensorflow
from musiclm_jax.evaluation import embedders
from musiclm_jax.evaluation import frechet
from musiclm_jax.evaluation import pipeline_eval
from musiclm_jax.evaluation import report

RATE = 24000
FRAME = 1600  # 0.1 s at 16 kHz: the fake models' frame
DIM = 6


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config(clear_constants=False)


def _tf():
  return quiet_tensorflow()


def _projection():
  return np.random.default_rng(0).standard_normal((FRAME, DIM)).astype(np.float32)


@pytest.fixture(scope='module')
def vggish_like(tmp_path_factory):
  """A SavedModel with VGGish's signature: 1-D 16 kHz waveform -> [frames, DIM + 1] (a fixed
  random projection of 0.1 s frames, then a column holding how many samples it was given)."""
  tf = _tf()

  class VggishLike(tf.Module):

    def __init__(self):
      super().__init__()
      self.projection = tf.Variable(_projection())

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, waveform):
      frames = tf.signal.frame(waveform, FRAME, FRAME)
      emb = tf.matmul(frames, self.projection)
      length = tf.cast(tf.size(waveform), tf.float32) * tf.ones_like(emb[:, :1])
      return tf.concat([emb, length], axis=1)

  path = str(tmp_path_factory.mktemp('vggish_like'))
  tf.saved_model.save(VggishLike(), path)
  return path


@pytest.fixture(scope='module')
def trill_like(tmp_path_factory):
  """A SavedModel with TRILL's signature: (samples [batch, n], sample_rate) -> {'embedding':
  [batch, frames, DIM + 1]} (the last column: the sample rate it was told)."""
  tf = _tf()

  class TrillLike(tf.Module):

    def __init__(self):
      super().__init__()
      self.projection = tf.Variable(_projection())

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32),
                                  tf.TensorSpec([], tf.int32)])
    def __call__(self, samples, sample_rate):
      emb = tf.einsum('bnf,fd->bnd', tf.signal.frame(samples, FRAME, FRAME), self.projection)
      rate = tf.cast(sample_rate, tf.float32) * tf.ones_like(emb[..., :1])
      return {'embedding': tf.concat([emb, rate], axis=-1), 'layer19': emb}

  path = str(tmp_path_factory.mktemp('trill_like'))
  tf.saved_model.save(TrillLike(), path)
  return path


def _noise_clips(count: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [(0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)
          for _ in range(count)]


# ------------------------------------------------------------------ SavedModel embedders


def test_vggish_saved_model_sees_16khz_audio_and_fad_of_a_set_with_itself_is_zero(vggish_like):
  embedder = embedders.vggish_embedder(vggish_like)
  assert embedder.name == 'vggish' and embedder.saved_model_dir == vggish_like
  clips = _noise_clips(6, 1.0) + _noise_clips(1, 0.5, seed=1)
  out = embedder.clip_outputs(clips)
  assert out.embeddings.shape == (7, DIM + 1) and out.tags is None
  # 1 s at 24 kHz reaches the model as 16000 samples (10 frames), 0.5 s as 8000 (5 frames).
  np.testing.assert_array_equal(out.embeddings[:, -1], [16000] * 6 + [8000])
  np.testing.assert_array_equal(out.num_frames, [10] * 6 + [5])
  # The mean over frames of the projection of the resampled audio.
  from musiclm_jax.audio.io import resample  # pylint: disable=g-import-not-at-top
  x = resample(clips[0], RATE, 16000).reshape(10, FRAME)
  np.testing.assert_allclose(out.embeddings[0, :DIM], (x @ _projection()).mean(0), rtol=1e-4,
                             atol=1e-5)
  emb = out.embeddings[:6, :DIM]
  assert frechet.fad(emb, emb) == pytest.approx(0.0, abs=1e-6)
  other = embedder.clip_outputs([c * 4 for c in clips[:6]]).embeddings[:, :DIM]
  assert frechet.fad(emb, other) > 1e-3


def test_trill_saved_model_gets_batched_samples_and_the_sample_rate(trill_like):
  embedder = embedders.trill_embedder(trill_like)
  out = embedder.clip_outputs(np.stack(_noise_clips(3, 0.6)))
  assert out.embeddings.shape == (3, DIM + 1) and out.tags is None
  np.testing.assert_array_equal(out.embeddings[:, -1], 16000)
  np.testing.assert_array_equal(out.num_frames, 6)
  assert embedders.trill_embedder(trill_like, output_key='layer19').clip_outputs(
      _noise_clips(1, 0.6)).embeddings.shape == (1, DIM)
  with pytest.raises(embedders.EmbedderError, match=r"expected a dict output with 'nope'"):
    embedders.trill_embedder(trill_like, output_key='nope').clip_outputs(_noise_clips(1, 0.6))


def test_saved_model_errors_name_the_folder_and_where_to_get_the_weights(tmp_path, vggish_like):
  missing = tmp_path / 'no_such_model'
  with pytest.raises(embedders.EmbedderError, match=rf'{missing} does not exist') as e:
    embedders.vggish_embedder(str(missing))
  assert 'tfhub.dev/google/vggish/1' in str(e.value) and 'saved_model_dir' in str(e.value)
  with pytest.raises(embedders.EmbedderError, match='no SavedModel folder given') as e:
    embedders.trill_embedder()
  assert 'nonsemantic-speech-benchmark/trill/3' in str(e.value)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(embedders.EmbedderError, match='has no saved_model.pb'):
    embedders.vggish_embedder(str(tmp_path / 'empty'))
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'saved_model.pb').write_bytes(b'not a protobuf at all')
  with pytest.raises(embedders.EmbedderError, match=rf'cannot load {tmp_path / "broken"}'):
    embedders.vggish_embedder(str(tmp_path / 'broken'))
  with pytest.raises(embedders.EmbedderError, match=r'clip 0 \(0.050 s\) gives no frame'):
    embedders.vggish_embedder(vggish_like).clip_outputs([np.zeros(1200, np.float32)])


# ------------------------------------------------------------------ MuLan


WINDOW, HOP = 4800, 2400


@pytest.fixture(scope='module')
def conditioner():
  """A randomly initialised tiny MuLan conditioner (the network tests/mulan builds)."""
  from musiclm_jax.audio.features import LogMelFrontEnd  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan import conditioning  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.audio import ResNetAudioTower  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.model import MuLan  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.text import BertEncoder  # pylint: disable=g-import-not-at-top
  network = MuLan(audio_tower=ResNetAudioTower.tiny(front_end=LogMelFrontEnd(n_mels=16),
                                                    stage_widths=(8, 16), num_groups=2),
                  text_tower=BertEncoder(hidden=16, layers=1, heads=2, mlp=32, max_positions=32,
                                         pooler=False),
                  embed_dim=8)
  # Only the audio side is initialised: the embedder never runs the text tower.
  params = network.init(jax.random.key(0), jnp.zeros((1, WINDOW)),
                        method=MuLan.embed_audio)['params']
  return conditioning.MuLanConditioner(network, params, np.zeros((2, 1, 8), np.float32), WINDOW,
                                       HOP, text_length=16)


def test_mulan_embedder_gives_the_unit_embeddings_mcc_uses(conditioner):
  # Clips of two lengths: one batch of 3 and one of 1 padded to 3 (two compilations in all).
  embedder = embedders.MulanAudioEmbedder(conditioner, batch_size=3)
  clips = _noise_clips(1, 0.2, seed=3) + [c[:9600] for c in _noise_clips(3, 0.4)]
  out = embedder.clip_outputs(clips)
  assert out.embeddings.shape == (4, 8) and out.tags is None
  np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out.num_frames, [1, 3, 3, 3])  # 4800-sample windows, hop 2400
  # The MCC path (MuLanConditioner.embed_audio), on the same shapes.
  np.testing.assert_allclose(out.embeddings[1:], conditioner.embed_audio(np.stack(clips[1:])),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.embeddings[0], conditioner.embed_audio(np.stack(clips[:1] * 3))[0],
                             rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ selection in evaluate_pipeline


def test_fad_embedders_resolve_names_and_objects(vggish_like, conditioner):
  fake = types.SimpleNamespace(name='fake', clip_outputs=lambda wavs: None)
  pipeline = types.SimpleNamespace(mulan=conditioner)
  from musiclm_jax import main  # pylint: disable=g-import-not-at-top
  main.parse_gin(['runs/eval.gin'], ["PIPELINE_DIR='p'", "EVAL_DIR='e'",
                                     f"vggish_embedder.saved_model_dir='{vggish_like}'",
                                     "evaluate_pipeline.fad_embedders=['musicnn', 'mulan', "
                                     "'vggish']"])
  names = gin.query_parameter('evaluate_pipeline.fad_embedders')
  resolved = pipeline_eval.resolve_fad_embedders(names + [fake], pipeline=pipeline,
                                                 musicnn_embedder=fake)
  assert [n for n, _ in resolved] == ['musicnn', 'mulan', 'vggish', 'fake']
  assert resolved[0][1] is fake and resolved[1][1].conditioner is conditioner
  assert isinstance(resolved[2][1], embedders.SavedModelEmbedder)
  gin.clear_config(clear_constants=False)
  with pytest.raises(pipeline_eval.EvalError, match=r"names 'vggish': vggish: no SavedModel "
                                                    r'folder given.*vggish_embedder\.'
                                                    r'saved_model_dir'):
    pipeline_eval.resolve_fad_embedders(['vggish'], pipeline=pipeline)
  with pytest.raises(pipeline_eval.EvalError, match=r"unknown embedder 'pann'.*'trill'"):
    pipeline_eval.resolve_fad_embedders(['pann'], pipeline=pipeline)
  with pytest.raises(pipeline_eval.EvalError, match="names 'mulan' twice"):
    pipeline_eval.resolve_fad_embedders(['mulan', 'mulan'], pipeline=pipeline)
  with pytest.raises(pipeline_eval.EvalError, match='is empty'):
    pipeline_eval.resolve_fad_embedders([], pipeline=pipeline)


def test_fad_summary_is_one_table_row():
  section = {'clips_per_set': 2, 'reference': 'half A', 'real_halves_floor': 1.0,
             'generated': 3.0, 'noise': 9.0, 'generated_all_clips': {'clips': 4, 'fad': 2.5},
             'fad_inf': {'skipped': 'few clips'}}
  assert pipeline_eval.fad_summary(section, 128) == {
      'dim': 128, 'real_halves_floor': 1.0, 'generated': 3.0, 'noise': 9.0,
      'generated_all_clips': 2.5}
  assert pipeline_eval.fad_summary({'skipped': 'why'}) == {'skipped': 'why'}


# ------------------------------------------------------------------ training curves


def _fake_run(root, name: str) -> str:
  """A run folder whose eval/ events hold loss and accuracy at three checkpoints (step 200
  written twice, the second time after step 300: the later value counts)."""
  from musiclm_jax.train.summaries import SummaryWriter  # pylint: disable=g-import-not-at-top
  run = os.path.join(root, name)
  writer = SummaryWriter(os.path.join(run, 'eval'), enabled=True)
  for step, loss in ((100, 3.0), (200, 2.5), (300, 2.0), (200, 2.4)):
    writer.scalars(step, {'eval/loss': loss, 'eval/accuracy': 1 / loss, 'eval/other': 0.0})
  writer.image(300, 'image/spectrogram', np.zeros((1, 4, 4, 3), np.float32))
  writer.close()
  return run


def test_training_curves_are_read_plotted_or_skipped_with_the_reason(tmp_path):
  run = _fake_run(str(tmp_path), 'semantic_run')
  (tmp_path / 'not_a_run').mkdir()
  curves = report.read_scalar_curves(os.path.join(run, 'eval'), tags=('eval/loss',
                                                                      'eval/accuracy'))
  assert curves == {'eval/loss': [(100, 3.0), (200, pytest.approx(2.4)), (300, 2.0)],
                    'eval/accuracy': [(100, pytest.approx(1 / 3)), (200, pytest.approx(1 / 2.4)),
                                      (300, pytest.approx(0.5))]}
  record = {'sources': {'semantic_stage': run, 'coarse_stage': str(tmp_path / 'moved'),
                        'fine_stage': str(tmp_path / 'not_a_run')}}
  found = pipeline_eval.training_curves(record, parts=('semantic_stage', 'coarse_stage',
                                                       'fine_stage', 'codec'))
  assert list(found['semantic_stage']) == ['eval/loss', 'eval/accuracy']
  assert 'moved' in found['coarse_stage'] and 'is missing' in found['coarse_stage']
  assert 'has no eval/ folder' in found['fine_stage']
  assert 'records no source run' in found['codec']

  out = tmp_path / 'report'
  report.write_report(str(out), {'fad': 1.0}, title='curves', training_curves=found,
                      tensorboard=False)
  text = (out / 'report.md').read_text()
  assert '## Training curves' in text
  assert '![semantic_stage training curves](plots/training_semantic_stage.png)' in text
  assert '| step | loss | accuracy |' in text and '| 200 | 2.4 | 0.4167 |' in text
  assert f'Skipped: its source run {tmp_path / "moved"} is missing' in text
  with open(out / 'plots' / 'training_semantic_stage.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(out / 'plots')) == ['training_semantic_stage.png']
  with pytest.raises(ValueError, match=r"training_curves\['x'\]"):
    report.write_report(str(out), {}, title='bad', training_curves={'x': {}})

