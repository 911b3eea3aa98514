"""The text-to-music pipeline on a tiny random pipeline: windows, joins, story, continuation,
melody, prompts, and the folder's checks."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from musiclm_jax.audio.io import save_wav
from musiclm_jax.codec.soundstream import decode_chunked
from musiclm_jax.generate import export
from musiclm_jax.generate import joins
from musiclm_jax.generate import pipeline as pipeline_lib
from musiclm_jax.generate.windows import Window, plan_windows
from tests.generate import tiny_pipeline as builder

RATE = 24000
UNIT = 960  # the stages' common time step (0.04 s)


def _hum(seconds: float, seed: int = 0) -> np.ndarray:
  """A hummed-like tune: notes with harmonics and vibrato."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * RATE)) / RATE
  notes = 57 + rng.choice([0, 2, 4, 5, 7, 9], size=int(np.ceil(seconds * 2)))
  pitch = notes[(t * 2).astype(int)] + 0.2 * np.sin(2 * np.pi * 5.5 * t)
  phase = 2 * np.pi * np.cumsum(440.0 * 2 ** ((pitch - 69) / 12)) / RATE
  return (0.3 * sum(a * np.sin(k * phase) for k, a in enumerate((1.0, 0.4, 0.2), 1))
          ).astype(np.float32)


# ------------------------------------------------------------------ the window plan


def test_windows_slide_with_the_previous_tokens_as_prefix():
  windows = plan_windows(100, 30, 15)
  assert windows[0] == Window(0, 0, 30, 30, 0)
  assert windows[1] == Window(15, 30, 45, 45, 0)
  # Every window after the first holds 15 units of prefix and generates 15 (one shape) ...
  assert all(w.prefix == 15 and w.generated == 15 for w in windows[1:-1])
  # ... and the last is a full window ending at the end, generating what is left.
  assert windows[-1] == Window(70, 90, 100, 100, 0)
  # The generated ranges tile the whole stream.
  assert [w.prefix_end for w in windows[1:]] == [w.stop for w in windows[:-1]]
  # Non-overlapping chunks (stride = window): prefix-free windows, then a tail with a prefix.
  chunks = plan_windows(70, 30, 30)
  assert [(w.start, w.prefix_end, w.stop) for w in chunks] == [(0, 0, 30), (30, 30, 60),
                                                              (40, 60, 70)]
  # Shorter than one window: one window.
  assert plan_windows(10, 30, 15) == [Window(0, 0, 10, 10, 0)]


def test_windows_stop_at_story_boundaries_and_start_after_a_continuation():
  windows = plan_windows(100, 30, 15, boundaries=[40, 50])
  for w in windows:  # no window generates across a boundary, each knows its segment
    assert (w.prefix_end < 40) == (w.stop <= 40) and (w.prefix_end < 50) == (w.stop <= 50)
    assert w.segment == (0 if w.stop <= 40 else 1 if w.stop <= 50 else 2)
  assert {40, 50} <= {w.prefix_end for w in windows}
  # A boundary cuts the generation, not the conditions: the window still covers 30 units.
  cut = next(w for w in windows if w.stop == 40)
  assert cut.end - cut.start == 30 and cut.end > cut.stop
  continued = plan_windows(100, 30, 15, start=42)
  assert continued[0] == Window(27, 42, 57, 57, 0)
  with pytest.raises(ValueError, match='stride'):
    plan_windows(100, 30, 31)
  with pytest.raises(ValueError, match='boundaries'):
    plan_windows(100, 30, 15, boundaries=[50, 40])


# ------------------------------------------------------------------ generation


def test_generate_text_gives_24khz_audio_deterministic_per_seed(pipeline):
  audio = pipeline.generate('a calm piano melody', 2.0, seed=3)
  assert audio.shape == (1, 2 * RATE) and audio.dtype == np.float32
  assert np.all(np.isfinite(audio)) and np.std(audio) > 0
  np.testing.assert_array_equal(pipeline.generate('a calm piano melody', 2.0, seed=3), audio)
  assert not np.array_equal(pipeline.generate('a calm piano melody', 2.0, seed=4), audio)
  # Non-ASCII prompts are fine (MuLan's tokenizer normalises them).
  assert pipeline.generate('café — piano à quatre mains, 音楽 🎹', 2.0).shape == (1, 2 * RATE)


def test_the_prompts_hold_bos_mulan_null_melody_and_the_earlier_stages(pipeline):
  g = pipeline.generate_tokens('fast drums', 2.0)
  mulan = pipeline.text_tokens(['fast drums'])
  semantic = pipeline.stages['semantic']
  first = g.windows[0]
  assert first.stage == 'semantic' and first.window == Window(0, 0, 50, 50, 0)
  spec = semantic.spec
  expected = np.concatenate([[0], spec.encode_stream('mulan', mulan)[0],
                             [spec.null_id('melody')] * 6])
  np.testing.assert_array_equal(first.prompt[0], expected)
  assert g.semantic_tokens.shape == (1, 50) and g.codec_tokens.shape == (1, 100, 4)
  coarse = next(r for r in g.windows if r.stage == 'coarse')
  cspec = pipeline.stages['coarse'].spec
  np.testing.assert_array_equal(
      coarse.prompt[0, 1:1 + 2 + 25],
      np.concatenate([cspec.encode_stream('mulan', mulan)[0],
                      cspec.encode_stream('semantic', g.semantic_tokens[:, :25])[0]]))
  assert set(r.stage for r in g.windows) == {'semantic', 'coarse', 'fine'}
  assert all(r.batched for r in g.windows if r.stage == 'fine')
  # Speed accounting: every generated token counted once, every part timed.
  assert g.tokens['semantic'] == 50 and g.tokens['coarse'] + g.tokens['fine'] == 100 * 4
  assert set(g.timings) == {'semantic', 'coarse', 'fine', 'codec_decode'}
  assert all(t > 0 for t in g.timings.values())


def test_a_3x_window_generation_has_no_discontinuity_at_the_joins_beyond_the_codec(pipeline):
  """6 s = 3 semantic windows (2 s): joins of the semantic (1 s stride), coarse (0.48 s) and
  fine (0.5 s chunks) windows, measured against every other codec frame boundary."""
  g = pipeline.generate_tokens(['a calm piano melody', 'fast drums'], 6.0, seed=1)
  assert g.audio.shape == (2, 6 * RATE)
  # Token level: each window's prefix is what the windows before it generated.
  for r in g.windows:
    stage = pipeline.stages[r.stage]
    target = stage.spec.target
    per_unit = r.unit_samples // target.hop_samples
    feature = g.semantic_tokens[..., None] if r.stage == 'semantic' else g.codec_tokens
    prefix = feature[:, r.window.start * per_unit:r.window.prefix_end * per_unit,
                     target.first_level:target.first_level + target.num_levels]
    if r.window.prefix:
      np.testing.assert_array_equal(r.prompt[:, -prefix.shape[1] * target.num_levels:],
                                    stage.spec.encode_stream(target.name, prefix))
  semantic = [r for r in g.windows if r.stage == 'semantic']
  assert len(semantic) == 5 and all(r.window.prefix == 25 for r in semantic[1:])
  # Audio level: the joins look like the codec's own frame boundaries.
  join_samples = sorted({r.window.prefix_end * r.unit_samples for r in g.windows
                         if r.window.prefix_end > 0})
  assert len(join_samples) >= 20
  # (The joins' jumps are distributed like the other boundaries': mean percentile rank ~50,
  # 50 +- 6 for 21 joins; measured 54 and 44 here, 49 over 10 clips of 5 seeds.)
  reports = [joins.join_report(g.audio[row], join_samples) for row in range(2)]
  for report in reports:
    assert report['mean_join_percentile'] <= 75, report
    assert report['join_mean'] <= 1.2 * report['other_mean'], report
  # The measure sees a real seam: decoding the windows apart restarts the codec decoder at
  # each join (mean rank 74 over the same 10 clips, the worst join above every boundary).
  edges = [0] + [s // 480 for s in join_samples] + [g.codec_tokens.shape[1]]
  naive = np.concatenate([np.asarray(decode_chunked(pipeline.codec, pipeline.codec_variables,
                                                    g.codec_tokens[:, a:b]))
                          for a, b in zip(edges, edges[1:])], axis=1)
  for row, report in enumerate(reports):
    seam = joins.join_report(naive[row], join_samples)
    assert seam['worst_join_percentile'] == 100.0, seam
    assert seam['join_mean'] > report['join_mean'] and seam['mean_join_percentile'] > (
        report['mean_join_percentile']), (seam, report)


def test_story_switches_the_mulan_tokens_at_each_boundary(pipeline):
  story = 'a calm piano melody:1|fast drums:1|a sad guitar:0.6'
  g = pipeline.generate_tokens(story=story, seed=2)
  assert g.audio.shape == (1, int(2.6 * RATE))
  assert g.boundaries_seconds == [1.0, 2.0]
  texts = [t for t, _ in pipeline_lib.parse_story(story)]
  tokens = pipeline.text_tokens(texts)
  for stage in ('semantic', 'coarse'):
    records = [r for r in g.windows if r.stage == stage]
    spec = pipeline.stages[stage].spec
    starts = {r.seconds()[0] for r in records}
    assert {1.0, 2.0} <= starts  # a window starts generating at each boundary
    for r in records:
      start, stop = r.seconds()
      segment = int(np.searchsorted([1.0, 2.0], start, side='right'))
      assert r.window.segment == segment
      assert stop <= [1.0, 2.0, 2.6][segment] + 1e-9  # never generates across a boundary
      np.testing.assert_array_equal(r.prompt[0, 1:3],
                                    spec.encode_stream('mulan', tokens[segment:segment + 1])[0])
  # The list form is the same story.
  again = pipeline.generate(story=[('a calm piano melody', 1), ('fast drums', 1.0),
                                   ('a sad guitar', 0.6)], seed=2)
  np.testing.assert_array_equal(again, g.audio)
  with pytest.raises(ValueError, match='shorter than 0.04 s'):
    pipeline.generate(story=[('calm', 1.0), ('drums', 0.01)])
  with pytest.raises(ValueError, match='leave seconds out'):
    pipeline.generate(story=story, seconds=5.0)
  with pytest.raises(ValueError, match='either text or story'):
    pipeline.generate('piano', story=story)


def test_continuation_prefixes_the_clip_tokens_and_continues_its_rendering(pipeline):
  clip = np.random.default_rng(0).uniform(-0.3, 0.3, 24480).astype(np.float32)  # 1.02 s
  g = pipeline.generate_tokens(None, 1.2, continuation=clip, seed=5)
  assert g.audio.shape == (1, int(1.2 * RATE))
  kept = clip[-25 * UNIT:]  # whole 40 ms units, the last ones
  assert g.prompt_frames == {'semantic_tokens': 25, 'codec_tokens': 50}
  np.testing.assert_array_equal(
      g.semantic_tokens[:, :25],
      np.asarray(pipeline._tokenize(pipeline._tokenizer_params, kept[None])))  # pylint: disable=protected-access
  np.testing.assert_array_equal(g.codec_tokens[:, :50],
                                pipeline._encode(kept[None]))  # pylint: disable=protected-access
  assert all(r.window.prefix_end >= 25 * UNIT // r.unit_samples for r in g.windows)
  # Without text, the MuLan tokens are the clip's audio tokens.
  spec = pipeline.stages['semantic'].spec
  np.testing.assert_array_equal(
      g.windows[0].prompt[0, 1:3],
      spec.encode_stream('mulan', pipeline.mulan.audio_tokens(kept)[None])[0])
  # The audio is the codec's rendering of the whole sequence after the clip: no seam.
  whole = np.asarray(decode_chunked(pipeline.codec, pipeline.codec_variables, g.codec_tokens))
  np.testing.assert_allclose(g.audio[0], whole[0, 25 * UNIT:25 * UNIT + g.audio.shape[1]],
                             atol=1e-5)
  with pytest.raises(ValueError, match='needs at least 0.04 s'):
    pipeline.generate('piano', 1.0, continuation=clip[:500])


def test_melody_tokens_condition_the_semantic_stage(pipeline, tmp_path):
  hum = _hum(3.0)
  g = pipeline.generate_tokens('a humming voice', 2.0, melody=hum, seed=6)
  melody = pipeline.melody.tokens(hum[None, :2 * RATE])  # 1 s windows, 0.5 s hop: 3 windows
  spec = pipeline.stages['semantic'].spec
  np.testing.assert_array_equal(g.windows[0].prompt[0, 3:9],
                                spec.encode_stream('melody', melody)[0])
  # From a file: the same audio (a float wav holds the samples exactly).
  path = str(tmp_path / 'hum.wav')
  save_wav(path, hum, RATE, subtype='FLOAT')
  np.testing.assert_array_equal(pipeline.generate('a humming voice', 2.0, melody=path, seed=6),
                                g.audio)
  corrupt = tmp_path / 'corrupt.wav'
  corrupt.write_bytes(b'RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio')
  with pytest.raises(ValueError, match=f'melody file {corrupt} cannot be used: unreadable'):
    pipeline.generate('a humming voice', 2.0, melody=str(corrupt))
  with pytest.raises(ValueError, match='missing'):
    pipeline.generate('a humming voice', 2.0, melody=str(tmp_path / 'nope.wav'))
  with pytest.raises(ValueError, match='at least 1 s of the tune'):
    pipeline.generate('a humming voice', 2.0, melody=hum[:RATE // 2])


@pytest.mark.parametrize('text, message', [
    ('', 'prompt is empty'),
    ('   \n', 'prompt is empty'),
    ('x' * 10240, '10,240 characters long; the limit is 1,000'),
    (42, 'must be a str'),
    ([], 'empty list'),
])
def test_bad_prompts_give_clear_errors(pipeline, text, message):
  with pytest.raises(ValueError, match=message):
    pipeline.generate(text, 2.0)


def test_bad_settings_give_clear_errors(pipeline):
  for seconds in (0, -1.0, float('nan'), 1e6):
    with pytest.raises(ValueError, match='seconds must be in'):
      pipeline.generate('piano', seconds)
  with pytest.raises(ValueError, match='unknown stages'):
    pipeline.generate('piano', 1.0, temperatures={'acoustic': 1.0})
  with pytest.raises(ValueError, match='one value per stage'):
    pipeline.generate('piano', 1.0, temperatures=[1.0, 0.9])
  for story, message in (('piano', 'expected TEXT:SECONDS'), ('piano:x', 'not a number'),
                         ('piano:0', 'positive number'), (':5', 'text is empty'), ('', 'TEXT')):
    with pytest.raises(ValueError, match=message):
      pipeline_lib.parse_story(story)


# ------------------------------------------------------------------ the folder


def test_load_names_a_missing_or_broken_part(tiny_pipeline, tmp_path):
  folder, _ = tiny_pipeline
  with pytest.raises(pipeline_lib.PipelineError, match='no such pipeline folder'):
    pipeline_lib.Pipeline.load(str(tmp_path / 'nothing'))
  with pytest.raises(pipeline_lib.PipelineError, match='not a pipeline folder'):
    pipeline_lib.Pipeline.load(str(tmp_path))
  broken = str(tmp_path / 'broken')
  shutil.copytree(folder, broken)
  shutil.rmtree(os.path.join(broken, 'codec'))
  with pytest.raises(pipeline_lib.PipelineError, match='the codec folder codec/ is missing'):
    pipeline_lib.Pipeline.load(broken)
  shutil.copytree(os.path.join(folder, 'codec'), os.path.join(broken, 'codec'))
  os.remove(os.path.join(broken, 'fine_stage', 'stage.json'))
  with pytest.raises(pipeline_lib.PipelineError, match='fine stage.*not a stage directory'):
    pipeline_lib.Pipeline.load(broken)
  shutil.rmtree(os.path.join(broken, 'fine_stage'))
  shutil.copytree(os.path.join(folder, 'fine_stage'), os.path.join(broken, 'fine_stage'))
  record = json.load(open(os.path.join(broken, 'pipeline.json')))
  record['sampling']['coarse']['stride_seconds'] = 0.03
  json.dump(record, open(os.path.join(broken, 'pipeline.json'), 'w'))
  with pytest.raises(pipeline_lib.PipelineError, match='sampling.coarse.stride_seconds'):
    pipeline_lib.Pipeline.load(broken)
  record['format'] = 'something/2'
  json.dump(record, open(os.path.join(broken, 'pipeline.json'), 'w'))
  with pytest.raises(pipeline_lib.PipelineError, match="format 'something/2'"):
    pipeline_lib.Pipeline.load(broken)


def test_assemble_checks_vocabularies_against_the_tokenizers(tiny_pipeline, tmp_path):
  from musiclm_jax.semantic.tokenizer import SemanticTokenizer, save_tokenizer  # pylint: disable=g-import-not-at-top
  _, parts = tiny_pipeline
  tokenizer, params = builder.semantic_tokenizer()
  bigger = SemanticTokenizer(encoder=tokenizer.encoder, layer=1, num_clusters=32)
  params = dict(params, centroids=np.zeros((32, params['centroids'].shape[1]), np.float32))
  other = save_tokenizer(str(tmp_path / 'tokenizer32'), bigger, params, {})
  with pytest.raises(pipeline_lib.PipelineError,
                     match="semantic stage's stream 'semantic'.*codebook_size 16, but the "
                           'semantic tokenizer has 32'):
    pipeline_lib.assemble_pipeline(str(tmp_path / 'p'), **dict(parts,
                                                                semantic_tokenizer_dir=other))
  assert not os.path.exists(tmp_path / 'p') and not [
      n for n in os.listdir(tmp_path) if n.startswith('.p-')]  # nothing left behind
  with pytest.raises(pipeline_lib.PipelineError, match='has no melody conditioner'):
    pipeline_lib.assemble_pipeline(str(tmp_path / 'p'),
                                   **dict(parts, melody_conditioner_dir=None))
  with pytest.raises(pipeline_lib.PipelineError,
                     match=r"coarse stage's stream 'coarse'.*conditions on codec_tokens "
                           r'levels \[1, 2\], which no earlier stage generates'):
    pipeline_lib.assemble_pipeline(str(tmp_path / 'p'),
                                   **dict(parts, coarse_stage_dir=parts['fine_stage_dir'],
                                          fine_stage_dir=parts['coarse_stage_dir']))


def test_assemble_is_atomic_refuses_to_overwrite_and_takes_sampling(tiny_pipeline, tmp_path):
  _, parts = tiny_pipeline
  out = str(tmp_path / 'p')
  pipeline_lib.assemble_pipeline(out, **parts, sampling={'semantic': {'stride_seconds': 0.4,
                                                                      'top_k': 8}})
  record = pipeline_lib.read_pipeline_record(out)
  assert record['sampling']['semantic'] == dict(temperature=1.0, top_k=8, top_p=1.0,
                                                guidance_scale=3.0, window_seconds=2.0,
                                                stride_seconds=0.4)
  assert record['sampling']['fine']['temperature'] == 0.4
  assert record['sampling']['fine']['guidance_scale'] == 1.0
  with pytest.raises(FileExistsError, match='overwrite=True'):
    pipeline_lib.assemble_pipeline(out, **parts)
  with pytest.raises(ValueError, match='unknown sampling settings'):
    pipeline_lib.assemble_pipeline(out, **parts, overwrite=True,
                                   sampling={'fine': {'temprature': 0.5}})
  assert pipeline_lib.read_pipeline_record(out)['sampling']['semantic']['top_k'] == 8  # kept
  pipeline_lib.assemble_pipeline(out, **parts, overwrite=True, params_dtype='bfloat16')
  record = pipeline_lib.read_pipeline_record(out)
  assert record['sampling']['semantic']['top_k'] == 0 and record['params_dtype'] == 'bfloat16'
  assert export.read_stage_record(os.path.join(out, 'coarse_stage'))['params_dtype'] == (
      'bfloat16')


def test_a_pipeline_without_melody_refuses_a_melody(tiny_pipeline, tmp_path):
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.spec import TokenSizes, semantic_stage_spec  # pylint: disable=g-import-not-at-top
  _, parts = tiny_pipeline
  model, _ = builder.stages()['semantic']
  sizes = TokenSizes(**dict(builder.SIZES, melody_levels=0))
  plain = StageModel(semantic_stage_spec(sizes), model.config, conditioning_dropout=0.1)
  params = builder.random_variables(plain.module, np.zeros((1, 8), np.int32))['params']
  stage = export.save_stage(str(tmp_path / 'semantic'), plain, params, crop_seconds=2.0)
  folder = pipeline_lib.assemble_pipeline(
      str(tmp_path / 'p'), **dict(parts, semantic_stage_dir=stage, melody_conditioner_dir=None))
  pipe = pipeline_lib.Pipeline.load(folder)
  assert not pipe.has_melody and pipe.melody is None
  with pytest.raises(ValueError, match='trained without melody conditioning'):
    pipe.generate('piano', 1.0, melody=_hum(2.0))
