"""The pipeline evaluation: ground-truth substitution in the pipeline, evaluate_pipeline's metrics
and report, and `musiclm-jax eval` with runs/eval.gin, on the tiny random pipeline and corpus."""
from __future__ import annotations

import json
import types

import gin
import numpy as np
import pytest

from musiclm_jax import main
from musiclm_jax.audio import opus
from musiclm_jax.evaluation import pipeline_eval
from musiclm_jax.evaluation.embedders import EmbedderOutputs
from tests.generate import tiny_pipeline as builder

RATE = 24000


@pytest.fixture(scope='module')
def tiny_pipeline(tmp_path_factory):
  """(pipeline folder, part dirs) of the random tiny parts (tests/generate/tiny_pipeline.py)."""
  return builder.build_pipeline(str(tmp_path_factory.mktemp('tiny_pipeline')))


@pytest.fixture(scope='module')
def pipeline(tiny_pipeline):
  from musiclm_jax.generate.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  return Pipeline.load(tiny_pipeline[0])


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config(clear_constants=False)


class FakeEmbedder:
  """MusicnnEmbedder's clip_outputs from loudness statistics (musicnn costs seconds a call)."""
  model = 'fake'
  feature = 'loudness'

  def clip_outputs(self, wavs):
    x = np.stack([np.asarray(w, np.float64) for w in wavs])
    frames = x[:, :x.shape[1] // 8 * 8].reshape(len(x), 8, -1)
    emb = np.log(np.sqrt(np.mean(frames ** 2, axis=-1)) + 1e-4)
    return types.SimpleNamespace(embeddings=emb, tags=1 / (1 + np.exp(-emb[:, :5] - 4)))


class FakeClassifier:
  """An AttributeClassifier stand-in: tempo and drums from the clip's loudness."""
  classes = {'tempo': ['slow', 'medium', 'fast'], 'drums': ['no', 'yes']}
  attributes = ('tempo', 'drums')

  def predict_proba(self, wavs):
    rms = np.sqrt(np.mean(np.square(np.asarray(wavs, np.float64)), axis=1))
    tempo = np.stack([np.cos(40 * rms), np.sin(40 * rms), rms], axis=1) ** 2
    drums = np.stack([1 - np.minimum(rms * 5, 1), np.minimum(rms * 5, 1)], axis=1)
    return {'tempo': tempo / tempo.sum(1, keepdims=True), 'drums': drums}

  def predict(self, wavs):
    return {a: np.argmax(p, axis=1) for a, p in self.predict_proba(wavs).items()}


def _tune(seconds: float) -> np.ndarray:
  t = np.arange(int(seconds * RATE)) / RATE
  return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.5 * (t > seconds / 2)))).astype(np.float32)


# ------------------------------------------------------------------ ground-truth substitution


def test_ground_truth_tokens_replace_their_stage_and_condition_the_later_ones(pipeline):
  semantic, codec = pipeline.tokenize_audio(_tune(2.0)[None])
  assert semantic.shape == (1, 50) and codec.shape == (1, 100, 4)
  g = pipeline.generate_tokens(['calm piano', 'fast drums'], 2.0, semantic_tokens=semantic)
  np.testing.assert_array_equal(g.semantic_tokens, np.repeat(semantic, 2, axis=0))
  assert g.ground_truth == ('semantic',) and g.timings['semantic'] == 0
  assert g.tokens['semantic'] == 0 and not [r for r in g.windows if r.stage == 'semantic']
  cspec = pipeline.stages['coarse'].spec
  coarse = next(r for r in g.windows if r.stage == 'coarse')
  np.testing.assert_array_equal(coarse.prompt[:, 3:3 + 25],  # BOS, 2 MuLan levels, semantic
                                np.repeat(cspec.encode_stream('semantic', semantic[:, :25]), 2, 0))

  coarse_codes = codec[..., :2]
  g = pipeline.generate_tokens('calm piano', 2.0, semantic_tokens=semantic,
                               coarse_tokens=coarse_codes)
  assert g.ground_truth == ('semantic', 'coarse')
  assert {r.stage for r in g.windows} == {'fine'}
  np.testing.assert_array_equal(g.semantic_tokens, semantic)
  np.testing.assert_array_equal(g.codec_tokens[..., :2], coarse_codes)
  fspec = pipeline.stages['fine'].spec
  first = min((r for r in g.windows), key=lambda r: r.window.start)
  np.testing.assert_array_equal(first.prompt[:, 1:],  # 0.5 s fine window: 25 coarse frames
                                fspec.encode_stream('coarse', coarse_codes[:, :25]))
  assert g.audio.shape == (1, 2 * RATE)


def test_ground_truth_tokens_of_the_wrong_shape_or_range_are_refused(pipeline):
  semantic, codec = pipeline.tokenize_audio(_tune(2.0)[None])
  with pytest.raises(ValueError, match=r'semantic_tokens must be \[batch, 50\].*got shape '
                                       r'\(1, 25\)'):
    pipeline.generate_tokens('calm piano', 2.0, semantic_tokens=semantic[:, :25])
  with pytest.raises(ValueError, match=r'coarse_tokens must be \[batch, 100, 2\]'):
    pipeline.generate_tokens('calm piano', 2.0, coarse_tokens=codec)
  with pytest.raises(ValueError, match=r'with batch 2 \(or 1\)'):
    pipeline.generate_tokens(['a', 'b'], 2.0, semantic_tokens=np.repeat(semantic, 3, 0))
  with pytest.raises(ValueError, match=r'semantic_tokens must lie in \[0, 16\)'):
    pipeline.generate_tokens('calm piano', 2.0, semantic_tokens=semantic + 16)
  with pytest.raises(ValueError, match='integer codes'):
    pipeline.generate_tokens('calm piano', 2.0, semantic_tokens=semantic.astype(float))


# ------------------------------------------------------------------ evaluate_pipeline


def test_shuffled_captions_are_a_fixed_derangement():
  for n in (2, 3, 10):
    order = pipeline_eval.derangement(n, seed=1)
    assert sorted(order) == list(range(n)) and all(order != np.arange(n))
    np.testing.assert_array_equal(order, pipeline_eval.derangement(n, seed=1))
  with pytest.raises(ValueError, match='at least 2'):
    pipeline_eval.derangement(1)


def test_generate_audio_batches_with_one_shape_and_per_batch_seeds():
  calls = []

  class Stub:
    def generate_tokens(self, text, seconds, *, seed, **kwargs):
      calls.append((list(text), seed, {k: v.tolist() for k, v in kwargs.items()}))
      rows = [float(t[1:]) for t in text]
      return types.SimpleNamespace(audio=np.repeat(np.array(rows)[:, None], 4, axis=1))

  captions = [f'c{i}' for i in range(5)]
  audio = pipeline_eval.generate_audio(Stub(), captions, 1.0, batch_size=2, seed=7,
                                       ground_truth={'semantic_tokens': np.arange(5)[:, None]})
  np.testing.assert_array_equal(audio[:, 0], np.arange(5))  # padding rows dropped
  assert [c[0] for c in calls] == [['c0', 'c1'], ['c2', 'c3'], ['c4', 'c4']]
  assert [c[1] for c in calls] == [7, 9, 11]
  assert calls[2][2] == {'semantic_tokens': [[4], [4]]}


def test_evaluate_pipeline_writes_every_section(tiny_pipeline, tiny_corpus_dir, tmp_path):
  out = tmp_path / 'eval'
  metrics = pipeline_eval.evaluate_pipeline(
      tiny_pipeline[0], str(out), dataset='embedded_music/tiny', split='train',
      data_dir=tiny_corpus_dir, max_examples=4, seconds=2.0, batch_size=4, melody_clips=1,
      progress=False, embedder=FakeEmbedder(), classifier=FakeClassifier())
  saved = json.loads((out / 'metrics.json').read_text())
  report = (out / 'report.md').read_text()
  assert report.startswith('# Pipeline evaluation: pipeline on embedded_music/tiny train')
  assert '| generated |' in report and '![tempo confusion matrix]' in report
  assert (out / 'plots' / 'confusion_tempo.png').exists()
  assert (out / 'plots' / 'confusion_drums_real.png').exists()
  assert list((out / 'tensorboard').iterdir())
  assert set(saved) == {'systems', 'fad', 'kld', 'mcc', 'attributes', 'melody',
                        'instrument_prompts', 'diagnostics', 'setup'}
  assert 'no instrument head' in saved['instrument_prompts']['skipped']
  assert saved['setup']['timings_seconds']['total'] > 0
  assert saved['setup']['clips'] == 4 and saved['setup']['seconds'] == 2.0
  # A derangement: no clip keeps its own caption.
  assert all(i != j for i, j in enumerate(saved['setup']['shuffled_caption_of']))

  fad = saved['fad']
  assert fad['clips_per_set'] == 2
  for row in ('real_halves_floor', 'noise', 'silence', 'generated', 'shuffled_captions',
              'codec_resynthesis', 'ground_truth_semantic', 'ground_truth_semantic_coarse'):
    assert fad[row] >= 0, row
  assert 'at least 50' in fad['fad_inf']['skipped']
  assert fad['generated_all_clips']['clips'] == 4
  assert saved['kld']['generated'] >= 0 and saved['kld']['real_other_clips'] >= 0
  assert set(saved['mcc']) >= {'generated', 'shuffled_captions', 'real_ceiling'}
  assert all(-1 <= v <= 1 for v in saved['mcc'].values())

  attributes = saved['attributes']
  for row in ('generated', 'real_ceiling', 'shuffled_floor'):
    assert set(attributes[row]) == {'tempo', 'drums'}
    assert set(attributes['balanced_accuracy'][row]) == {'tempo', 'drums'}
    assert 0 <= attributes[row]['tempo']['accuracy'] <= 1 and attributes[row]['drums']['n'] == 4

  melody = saved['melody']  # the tiny pipeline's semantic stage follows a melody
  if 'skipped' in melody:
    assert 'no hummed or whistled clip' in melody['skipped']
  else:
    assert melody['clips'] == 1 and 0 <= melody['with_melody'] <= 1
    assert 0 <= melody['text_only_floor'] <= 1

  diagnostics = saved['diagnostics']
  codec = diagnostics['codec_resynthesis']
  assert codec['levels'] == 4 and codec['mel_distance'] > 0 and 'si_snr_db' in codec
  for stage in ('semantic', 'coarse', 'fine'):
    tf = diagnostics['teacher_forced'][stage]
    assert tf['loss'] > 0 and 0 <= tf['accuracy'] <= 1 and tf['sequences'] >= 4, stage
    assert tf['uniform_loss'] == pytest.approx(np.log(16 if stage == 'semantic' else 32))
  assert diagnostics['teacher_forced']['coarse']['window_seconds'] == 1.0
  assert diagnostics['teacher_forced']['semantic']['sequences'] == 4  # one 2 s window a clip
  assert 'loss/level_3' in diagnostics['teacher_forced']['fine']
  assert 'loss_text_conditioned' in diagnostics['teacher_forced']['semantic']
  assert 'loss_text_conditioned' not in diagnostics['teacher_forced']['fine']
  assert list(saved)[0] == 'systems'  # the report opens with the quality ladder
  with_opus = opus.available()
  assert list(saved['systems']) == [s for s in pipeline_eval.SYSTEMS
                                    if s != 'opus_6kbps' or with_opus]
  if with_opus:  # the codec's baseline on the same clips
    assert diagnostics['opus_6kbps']['mel_distance'] > 0
    assert saved['systems']['opus_6kbps']['mel_distance'] == diagnostics['opus_6kbps'][
        'mel_distance']
  else:
    assert 'opus-tools' in diagnostics['opus_6kbps']['skipped']
  for row in ('codec_resynthesis', 'ground_truth_semantic_coarse', 'ground_truth_semantic',
              'generated', 'shuffled_captions'):
    assert {'fad', 'kld', 'mcc', 'attribute_balanced_accuracy', 'mel_distance'} <= set(
        saved['systems'][row]), row
  assert metrics['systems']['generated']['fad'] == saved['systems']['generated']['fad']


def test_teacher_forced_sequences_are_the_training_layout(pipeline):
  audio = np.stack([_tune(2.0), _tune(2.0)[::-1].copy()])
  semantic, codec = pipeline.tokenize_audio(audio)
  mulan = pipeline.mulan.audio_tokens(audio)
  tokens, weights = pipeline_eval.stage_sequences(pipeline, 'fine', audio, semantic, codec,
                                                  mulan)
  spec = pipeline.stages['fine'].spec
  # 0.5 s windows: 4 per clip, window-major; 25 coarse frames x 2 levels, then 25 fine x 2.
  assert tokens.shape == (8, 100) and weights[:, :50].sum() == 0 and weights[:, 50:].all()
  np.testing.assert_array_equal(tokens[2, :50], spec.encode_stream('coarse',
                                                                  codec[:1, 25:50, :2])[0])
  np.testing.assert_array_equal(spec.unflatten_predicted(tokens[1:2, 50:]), codec[1:, :25, 2:])


def test_melody_section_says_why_it_is_skipped(pipeline):
  no_melody = types.SimpleNamespace(has_melody=False)
  clips = pipeline_eval.SplitClips([np.zeros(RATE, np.float32)],
                                   {'caption': ['a tune'], 'timbre': ['instrument']})
  result = pipeline_eval.melody_section(no_melody, clips, clips, np.zeros((1, RATE)), RATE,
                                        max_clips=1, seed=0, sampling={})
  assert 'not conditioned on melody' in result['skipped']
  result = pipeline_eval.melody_section(pipeline, clips, clips, np.zeros((1, RATE)), RATE,
                                        max_clips=1, seed=0, sampling={})
  assert 'no hummed or whistled clip' in result['skipped']


# ------------------------------------------------------------------ FAD embedders, training curves


class LoudnessEmbedder:
  """An embedder without a tag classifier: frame loudness statistics (no KLD from it)."""
  name = 'loudness'

  def clip_outputs(self, wavs):
    x = np.stack([np.asarray(w, np.float64) for w in wavs])
    frames = x[:, :x.shape[1] // 8 * 8].reshape(len(x), 8, -1)
    emb = np.log(np.sqrt(np.mean(frames ** 2, axis=-1)) + 1e-4)
    return EmbedderOutputs(embeddings=emb, tags=None, num_frames=np.full(len(x), 8))


def test_evaluate_pipeline_scores_fad_per_embedder_and_reports_training_curves(
    tiny_pipeline, tiny_corpus_dir, tmp_path):
  folder, parts = tiny_pipeline
  out = tmp_path / 'eval'
  metrics = pipeline_eval.evaluate_pipeline(
      folder, str(out), dataset='embedded_music/tiny', split='train', data_dir=tiny_corpus_dir,
      max_examples=4, seconds=1.0, batch_size=4, melody_clips=0, diagnostics=False,
      classifier_dir=None, progress=False, fad_embedders=[LoudnessEmbedder(), 'mulan'])
  assert metrics['setup']['fad_embedders'] == ['loudness', 'mulan']
  table = metrics['fad_by_embedder']
  assert list(table) == ['loudness', 'mulan'] and table['mulan']['dim'] == 8
  for name in ('real_halves_floor', 'generated', 'noise', 'silence', 'generated_all_clips'):
    assert table['mulan'][name] >= 0 and table['loudness'][name] >= 0, name
  assert metrics['fad']['generated'] == table['loudness']['generated']  # the first: headline
  generated = metrics['systems']['generated']
  assert generated['fad'] == table['loudness']['generated']
  assert generated['fad_mulan'] == table['mulan']['generated'] and 'kld' not in generated
  assert 'none of fad_embedders (loudness, mulan) gives tag posteriors' in (
      metrics['kld']['skipped'])
  text = (out / 'report.md').read_text()
  assert '### fad_by_embedder' in text and '- kld: skipped (none of fad_embedders' in text
  assert '## Training curves' in text
  assert f'Skipped: its source {parts["semantic_stage_dir"]} has no eval/ folder' in text
  assert (out / 'training_curves.json').exists()


# ------------------------------------------------------------------ the command


def test_eval_command_runs_the_pipeline_evaluation_end_to_end(tiny_pipeline, tiny_corpus_dir,
                                                              tmp_path, capsys):
  out = tmp_path / 'eval'
  rc = main.main(['eval', '--gin_file=examples/eval_tiny_cpu.gin',
                  f"--gin.PIPELINE_DIR='{tiny_pipeline[0]}'", f"--gin.EVAL_DIR='{out}'",
                  "--gin.DATASET='embedded_music/tiny'", f"--gin.DATA_DIR='{tiny_corpus_dir}'",
                  "--gin.SPLIT='test'", '--gin.MAX_EXAMPLES=2', '--gin.DIAGNOSTICS=False',
                  f"--gin.CLASSIFIER_DIR='{tmp_path / 'no_classifier'}'",
                  '--gin.evaluate_pipeline.progress=False'])
  assert rc == 0, capsys.readouterr().err
  saved = json.loads((out / 'metrics.json').read_text())
  assert saved['setup']['clips'] == 2 and saved['setup']['embedder'] == 'MTT_musicnn penultimate'
  assert 'no attribute classifier at' in saved['attributes']['skipped']
  assert 'at least 4' in saved['fad']['skipped']
  assert saved['diagnostics'] == {'skipped': 'diagnostics=False'}
  assert saved['kld']['generated'] >= 0 and -1 <= saved['mcc']['generated'] <= 1


def test_eval_dispatches_on_what_the_gin_files_bind():
  main.parse_gin(['runs/eval.gin'], ["PIPELINE_DIR='p'", "EVAL_DIR='e'"])
  assert main.eval_target() == main.EVAL_PIPELINE
  gin.clear_config(clear_constants=False)
  main.parse_gin(['examples/toy_lm_eval.gin'], ["MODEL_DIR='m'"])
  assert main.eval_target() == ('musiclm_jax.train.trainer', 'evaluate')
  gin.clear_config(clear_constants=False)
  main.parse_gin(['examples/toy_lm_eval.gin', 'runs/eval.gin'],
                 ["MODEL_DIR='m'", "PIPELINE_DIR='p'", "EVAL_DIR='e'"])
  with pytest.raises(main.UsageError, match='bind both evaluate'):
    main.eval_target()


def test_eval_names_a_bad_or_missing_pipeline_dir(tmp_path, capsys):
  rc = main.main(['eval', '--gin_file=runs/eval.gin', f"--gin.PIPELINE_DIR='{tmp_path / 'nope'}'",
                  f"--gin.EVAL_DIR='{tmp_path / 'out'}'"])
  assert rc == 2
  err = capsys.readouterr().err
  assert f"eval: pipeline_dir='{tmp_path / 'nope'}'" in err and 'no such pipeline folder' in err
  assert len(err.strip().splitlines()) == 1
  gin.clear_config(clear_constants=False)
  (tmp_path / 'empty').mkdir()
  rc = main.main(['eval', '--gin_file=runs/eval.gin', f"--gin.PIPELINE_DIR='{tmp_path / 'empty'}'",
                  f"--gin.EVAL_DIR='{tmp_path / 'out'}'"])
  assert rc == 2 and 'not a pipeline folder' in capsys.readouterr().err
  gin.clear_config(clear_constants=False)
  rc = main.main(['eval', '--gin_file=runs/eval.gin', f"--gin.EVAL_DIR='{tmp_path / 'out'}'"])
  assert rc == 2 and 'PIPELINE_DIR' in capsys.readouterr().err
