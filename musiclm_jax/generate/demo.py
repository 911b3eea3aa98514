r"""`musiclm-jax demo`: text-to-music from a pipeline folder, as a page to listen to.

    musiclm-jax demo [--checkpoint PIPELINE_DIR] [--out_dir runs/demo] [--seconds 8] \
        [--caption TEXT ...] [--melody hum.wav] [--story "text:4|text:4"] [--seed 0]

Generates (1) a handful of captions in one batch, (2) a hummed melody followed with the first
caption, when the pipeline is melody-conditioned (the tune is hummed by the embedded corpus's
voice synth from a music21 folk tune unless --melody gives a file), and (3) a story: captions
that change at given seconds. Writes, into --out_dir:

  NN_<slug>.wav / .png     each generated clip and its log-mel spectrogram
  melody_input.wav / .png  the tune given (melody-conditioned pipelines)
  index.html               audio players, captions, spectrograms, the pipeline's description,
                           generation speed and, when the folder has one, its manifest's
                           evaluation summary (relative links: the folder can be copied)
  demo.json                the same as data

The default --checkpoint is the pipeline shipped in the package (musiclm_jax/pretrained/tiny,
made by `make train-tiny`, gin_configs/pipelines/tiny.gin). Nothing is fetched from a network.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from musiclm_jax.common import atomic

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'pretrained')
DEFAULT_CHECKPOINT = os.path.join(PRETRAINED_DIR, 'tiny')
# Captions in the embedded corpus's vocabulary (instruments, tempo bands, modes, drums): what the
# tiny pipeline was trained on.
DEFAULT_CAPTIONS = (
    'A calm solo piano melody in a major key at a slow tempo.',
    'A lively violin tune with drums at a fast tempo.',
    'A flute plays a gentle folk melody in a minor key, without drums.',
    'An acoustic guitar and a cello play a moderate waltz.',
)
DEFAULT_STORY = ('A calm solo piano melody in a major key:4|'
                 'A lively violin tune with drums at a fast tempo:4')
MELODY_CAPTION_INDEX = 0


class DemoError(ValueError):
  """A bad demo argument or a missing pipeline folder; the message says which."""


def slug(text: str, limit: int = 40) -> str:
  """A file-name-safe short form of a caption."""
  words = re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')
  return words[:limit].rstrip('_') or 'clip'


def hummed_tune(seconds: float, sample_rate: int = 24000, tune_index: int = 0,
                seed: int = 0) -> tuple[np.ndarray, str]:
  """A folk tune from music21's bundled corpus, hummed by the embedded corpus's voice synth.

  Returns:
    (float32 samples [seconds * sample_rate], the tune's title).
  """
  from musiclm_jax.data.embedded_music import melodies  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data.embedded_music import render  # pylint: disable=g-import-not-at-top
  tunes = melodies.list_tunes()
  if not tunes:
    raise DemoError('music21 ships no corpus tunes here: pass --melody FILE')
  melody = tune = None
  for k in range(len(tunes)):  # the first that loads (some have meter changes and are skipped)
    tune = tunes[(tune_index + k) % len(tunes)]
    try:
      melody = melodies.load_melody(tune)
      break
    except melodies.SkipMelody:
      continue
  if melody is None:
    raise DemoError('no music21 corpus tune could be loaded: pass --melody FILE')
  spec = render.sample_render_spec(
      melody, np.random.default_rng(seed), clip_seconds=seconds, sample_rate=sample_rate,
      hum_fraction=1.0, whistle_fraction=0.0, drums_fraction=0.0, two_instruments_fraction=0.0)
  audio = np.asarray(render.render_rendering(melody, spec), np.float32)
  n = int(round(seconds * sample_rate))
  audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
  return audio.astype(np.float32), getattr(melody, 'title', None) or str(tune)


def _speed(result, sample_rate: int) -> dict[str, Any]:
  seconds = result.audio.shape[0] * result.audio.shape[1] / sample_rate
  compute = float(sum(result.timings.values()))
  return {'audio_seconds': seconds, 'compute_seconds': compute,
          'compute_per_audio_second': compute / max(seconds, 1e-9),
          'timings': {k: float(v) for k, v in result.timings.items()},
          'tokens': {k: int(v) for k, v in result.tokens.items()}}


def _save(out_dir: str, name: str, audio: np.ndarray, sample_rate: int, title: str,
          marks: Sequence[float] = ()) -> dict[str, str]:
  from musiclm_jax.audio.io import save_wav  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.spectrogram import save_spectrogram  # pylint: disable=g-import-not-at-top
  wav, png = f'{name}.wav', f'{name}.png'
  save_wav(os.path.join(out_dir, wav), audio, sample_rate)
  save_spectrogram(os.path.join(out_dir, png), audio, sample_rate, title=title[:110],
                   marks_seconds=marks)
  return {'wav': wav, 'png': png}


def _manifest_summary(checkpoint: str) -> Optional[dict[str, Any]]:
  path = os.path.join(checkpoint, 'manifest.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    manifest = json.load(f)
  return manifest.get('evaluation')


def write_page(out_dir: str, record: dict[str, Any]) -> str:
  """index.html from demo.json's record (relative links); returns its path."""
  e = html.escape
  rows = []
  for item in record['items']:
    rows.append(
        f'<section><h3>{e(item["section"])}</h3><p class="caption">{e(item["text"])}</p>'
        f'<audio controls preload="none" src="{e(item["wav"])}"></audio><br>'
        f'<img src="{e(item["png"])}" alt="log-mel spectrogram" width="800"></section>')
  speed = record['speed']
  speed_rows = ''.join(
      f'<tr><td>{e(name)}</td><td>{s["audio_seconds"]:.1f}</td><td>{s["compute_seconds"]:.1f}</td>'
      f'<td>{s["compute_per_audio_second"]:.2f}</td></tr>' for name, s in speed.items())
  evaluation = record.get('evaluation')
  eval_html = ('<p>No evaluation summary (the pipeline folder has no manifest.json).</p>'
               if not evaluation else
               f'<pre>{e(json.dumps(evaluation, indent=2, sort_keys=True))}</pre>')
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>musiclm-jax demo</title>
<style>body{{font-family:sans-serif;max-width:860px;margin:2em auto}} .caption{{font-style:italic}}
section{{margin-bottom:1.5em}} td,th{{padding:2px 10px;text-align:right}} pre{{background:#f4f4f4;
padding:8px;overflow:auto}}</style></head><body>
<h1>musiclm-jax: text to music</h1>
<p>Pipeline: <code>{e(record['checkpoint'])}</code>, seed {record['seed']},
made {e(record['created'])}.</p>
<pre>{e(record['pipeline'])}</pre>
{''.join(rows)}
<h2>Speed on this machine (compilation included in the first call)</h2>
<table><tr><th>call</th><th>audio s</th><th>compute s</th><th>compute s per audio s</th></tr>
{speed_rows}</table>
<h2>Evaluation of this pipeline</h2>
{eval_html}
</body></html>
"""
  return atomic.write_text(os.path.join(out_dir, 'index.html'), page)


def run_demo(checkpoint: str = DEFAULT_CHECKPOINT, out_dir: str = 'runs/demo',
             captions: Sequence[str] = DEFAULT_CAPTIONS, seconds: float = 8.0,
             melody: Optional[str] = None, story: Optional[str] = DEFAULT_STORY,
             seed: int = 0, progress: bool = True, mesh_shape: Any = None) -> dict[str, Any]:
  """Generates the demo's clips and writes the page (module docstring); returns demo.json's data."""
  from musiclm_jax.generate import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint):
    hint = (' (the package ships none yet: make one with `make train-tiny`, or pass '
            '--checkpoint)' if os.path.abspath(checkpoint) == DEFAULT_CHECKPOINT else '')
    raise DemoError(f'--checkpoint {checkpoint}: no pipeline folder there{hint}')
  if not captions:
    raise DemoError('give at least one caption')
  pipeline_lib.check_seed(seed, '--seed')  # before the pipeline loads, not after
  for c in captions:
    pipeline_lib.check_prompt(c, '--caption')
  story_parts = pipeline_lib.parse_story(story) if story else None
  if melody is not None and not os.path.isfile(melody):
    raise DemoError(f'--melody {melody}: no such file')
  os.makedirs(out_dir, exist_ok=True)
  pipe = pipeline_lib.Pipeline.load(checkpoint, mesh_shape=mesh_shape)
  rate = pipe.sample_rate
  record: dict[str, Any] = {
      'checkpoint': checkpoint, 'seed': seed, 'pipeline': pipe.describe(),
      'created': time.strftime('%Y-%m-%d %H:%M:%S'), 'items': [], 'speed': {},
      'evaluation': _manifest_summary(checkpoint)}

  def say(text):
    print(f'[demo] {text}', file=sys.stderr)

  say(f'{len(captions)} captions, {seconds:g} s each, one batch')
  result = pipe.generate_tokens(list(captions), seconds, seed=seed, progress=progress)
  record['speed']['captions'] = _speed(result, rate)
  for i, (caption, audio) in enumerate(zip(captions, result.audio)):
    files = _save(out_dir, f'{i + 1:02d}_{slug(caption)}', audio, rate, caption)
    record['items'].append({'section': 'Text', 'text': caption, **files})

  if pipe.has_melody:
    if melody is None:
      tune, title = hummed_tune(seconds, rate)
      source = f'"{title}" (music21 corpus), hummed by the embedded corpus voice synth'
    else:
      tune, source = pipeline_lib.read_audio_input(melody, '--melody'), melody
    files = _save(out_dir, 'melody_input', tune, rate, f'melody given: {source}')
    record['items'].append({'section': 'Melody given', 'text': source, **files})
    caption = captions[MELODY_CAPTION_INDEX]
    say(f'the melody, with "{caption}"')
    result = pipe.generate_tokens(caption, seconds, melody=tune, seed=seed, progress=progress)
    record['speed']['melody'] = _speed(result, rate)
    files = _save(out_dir, f'{len(captions) + 1:02d}_melody_{slug(caption)}', result.audio[0],
                  rate, f'{caption} + the melody')
    record['items'].append({'section': 'Text + hummed melody', 'text': caption, **files})
  else:
    record['melody_skipped'] = ('the pipeline\'s semantic stage is not conditioned on melody '
                                'tokens')
    say(f'melody skipped: {record["melody_skipped"]}')

  if story_parts:
    total = sum(s for _, s in story_parts)
    say(f'a story of {len(story_parts)} parts, {total:g} s')
    result = pipe.generate_tokens(None, None, story=story_parts, seed=seed, progress=progress)
    record['speed']['story'] = _speed(result, rate)
    text = ' | '.join(f'{t} ({s:g} s)' for t, s in story_parts)
    files = _save(out_dir, f'{len(record["items"]) + 1:02d}_story', result.audio[0], rate,
                  'story: ' + text, marks=result.boundaries_seconds)
    record['items'].append({'section': 'Story (dashed lines: where the text changes)',
                            'text': text, **files})

  atomic.write_json(os.path.join(out_dir, 'demo.json'), record, sort_keys=False)
  page = write_page(out_dir, record)
  record['page'] = page
  return record


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='musiclm-jax demo', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', default=DEFAULT_CHECKPOINT,
                      help='a pipeline folder (default: the one shipped in the package)')
  parser.add_argument('--out_dir', default='runs/demo')
  parser.add_argument('--caption', action='append', default=None,
                      help='a caption (repeat for more; default: four corpus-style captions)')
  parser.add_argument('--seconds', type=float, default=8.0, help='seconds per clip')
  parser.add_argument('--melody', default=None, help='an audio file of a tune (default: a hum)')
  parser.add_argument('--story', default=DEFAULT_STORY,
                      help='"text:seconds|text:seconds" ("" for none)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--mesh_shape', default=None, help="'auto' or 'D,F,M' (default one device)")
  parser.add_argument('--no_progress', action='store_true')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  from musiclm_jax.generate import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from musiclm_jax.main import setup_compilation_cache  # pylint: disable=g-import-not-at-top
  setup_compilation_cache()
  try:
    record = run_demo(args.checkpoint, args.out_dir, args.caption or DEFAULT_CAPTIONS,
                      args.seconds, args.melody, args.story or None, args.seed,
                      progress=not args.no_progress,
                      mesh_shape=pipeline_lib.parse_mesh_shape(args.mesh_shape))
  except (DemoError, pipeline_lib.PipelineError, ValueError) as e:
    print(f'musiclm-jax demo: error: {e}', file=sys.stderr)
    return 2
  for name, s in record['speed'].items():
    print(f'{name}: {s["audio_seconds"]:.1f} s of audio in {s["compute_seconds"]:.1f} s '
          f'({s["compute_per_audio_second"]:.2f} s per audio second, compilation included)')
  print(f'Demo page: {os.path.abspath(record["page"])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
