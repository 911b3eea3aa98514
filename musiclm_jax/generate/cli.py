r"""`musiclm-jax sample`: text (+ melody, continuation, story) -> a wav and its spectrogram PNG.

  musiclm-jax sample --checkpoint PIPELINE_DIR --prompt "calm piano over soft strings" \
    --seconds 30 --out out.wav [--melody hum.wav] [--continue clip.wav] \
    [--story "text one:15|text two:15"] [--seed 0] [--guidance_scale 3] [--batch 1] \
    [--mesh_shape auto]

PIPELINE_DIR is a pipeline folder (musiclm_jax/generate/pipeline.py, made by `musiclm-jax
assemble_pipeline`). The wav (16-bit, 24 kHz, written atomically) and a log-mel spectrogram
PNG with the same name go to --out; with --batch N > 1, OUT-1.wav .. OUT-N.wav (and PNGs).
A progress bar per stage goes to stderr. --mesh_shape samples the stage LMs sharded over a
(data, fsdp, model) device mesh, for models too large for one device or to split the batch
(for a seed, the same audio as one device). Bad input (an empty or too long prompt, a story
segment without seconds, an unreadable melody or clip, a folder that is not a pipeline, a mesh
that does not fit the devices or the models, a sampling setting that is not a finite number
in range, a seed outside 0 .. 2**32 - 1, an --out that cannot be written) exits with status 2
and one line saying what is wrong. The flags and the --out path are checked before the
pipeline is loaded: a bad setting or an unwritable --out never costs a load or a sampling run.

Sampling settings: --temperatures finite and >= 0 (0 = greedy), --top_k an int >= 0 (0 = all
ids), --guidance_scale finite and >= 0 (0 = unconditional, 1 = no guidance, > 1 guided),
--seconds in (0, 600], --batch >= 1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence


class _Parser(argparse.ArgumentParser):
  """argparse whose errors raise (so `sample_main` reports them its own way)."""

  def error(self, message):
    raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='musiclm-jax sample', description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='the pipeline folder')
  parser.add_argument('--out', required=True, help='the wav to write (.wav)')
  parser.add_argument('--prompt', default=None, help='the text prompt')
  parser.add_argument('--melody', default=None, help='an audio file of a tune to follow')
  parser.add_argument('--continue', dest='continuation', default=None,
                      help='an audio file to continue')
  parser.add_argument('--story', default=None,
                      help="segments 'text one:SECONDS|text two:SECONDS' (instead of --prompt)")
  parser.add_argument('--seconds', type=float, default=None,
                      help='seconds to generate (default 10; with --story its total)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--guidance_scale', type=float, default=None,
                      help="classifier-free guidance of the MuLan-conditioned stages (default: "
                      "the folder's)")
  parser.add_argument('--temperatures', default=None,
                      help='semantic,coarse,fine temperatures (default: the folder\'s, the '
                      "paper's 1.0,0.95,0.4)")
  parser.add_argument('--top_k', type=int, default=None, help='top-k of every stage')
  parser.add_argument('--batch', type=int, default=1, help='samples to generate')
  parser.add_argument('--mesh_shape', default=None,
                      help='sample the stage LMs sharded on a device mesh: "auto" (as much '
                      "tensor parallelism as the stages' shapes allow, the other devices data "
                      'parallel) or the sizes DATA,FSDP,MODEL of its axes, one of them -1 for '
                      'the other devices: 1,1,-1 is tensor parallel (heads, MLP, vocabulary '
                      'split: models too large for one device), --mesh_shape=-1,1,1 data '
                      'parallel (the batch split, padded to the device count; mind the "=" '
                      'before a leading "-"). Default: one device. The codec, tokenizer and '
                      'MuLan stay unsharded')
  parser.add_argument('--no_progress', action='store_true', help='no progress bars')
  return parser


def _outputs(out: str, batch: int) -> list[str]:
  stem, ext = os.path.splitext(out)
  if ext.lower() != '.wav':
    raise ValueError(f'--out {out!r}: give a .wav path')
  if batch == 1:
    return [out]
  return [f'{stem}-{i + 1}{ext}' for i in range(batch)]


def _check_writable(path: str) -> None:
  """Raises ValueError unless `path` can be written: not a directory, and its parent a
  writable directory or creatable in one (the writers create missing parent directories)."""
  if os.path.isdir(path):
    raise ValueError(f'--out {path}: cannot be written: it is a directory')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'--out {path}: cannot be written: {parent} is not a directory')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'--out {path}: cannot be written: no permission to write in {parent}')


def sample_main(argv: Sequence[str]) -> int:
  """Runs `musiclm-jax sample ARGS`; returns the exit status (2 for bad input)."""
  try:
    args = build_parser().parse_args(list(argv))
  except ValueError as e:
    print(f'musiclm-jax sample: error: {e}', file=sys.stderr)
    return 2
  try:
    return _sample(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f'musiclm-jax sample: error: {message}', file=sys.stderr)
    return 2


def _sample(args: argparse.Namespace) -> int:
  from musiclm_jax.audio.io import save_wav  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.spectrogram import save_spectrogram  # pylint: disable=g-import-not-at-top
  from musiclm_jax.main import setup_compilation_cache  # pylint: disable=g-import-not-at-top

  if args.batch < 1:
    raise ValueError(f'--batch must be at least 1, got {args.batch}')
  if args.prompt is not None and args.story is not None:
    raise ValueError('give --prompt or --story, not both')
  if args.prompt is None and args.story is None and args.continuation is None:
    raise ValueError('give --prompt (or --story, or --continue)')
  if args.prompt is not None:
    pipeline_lib.check_prompt(args.prompt, '--prompt')
  story = pipeline_lib.parse_story(args.story) if args.story is not None else None
  temperatures = None
  if args.temperatures is not None:
    try:
      temperatures = [float(t) for t in args.temperatures.split(',')]
    except ValueError as e:
      raise ValueError(f'--temperatures {args.temperatures!r}: expected three numbers '
                       'semantic,coarse,fine') from e
    if len(temperatures) != len(pipeline_lib.STAGES):
      raise ValueError(f'--temperatures {args.temperatures!r}: expected three numbers '
                       'semantic,coarse,fine')
  # The settings, checked as the pipeline will check them, before the (slow) load.
  settings = [('--guidance_scale', 'guidance_scale', args.guidance_scale),
              ('--top_k', 'top_k', args.top_k)]
  settings += [(f'--temperatures (the {stage} stage)', 'temperature', t)
               for stage, t in zip(pipeline_lib.STAGES, temperatures or [])]
  for flag, field, value in settings:
    if value is not None:
      try:
        pipeline_lib.check_setting(field, value)
      except ValueError as e:
        raise ValueError(f'{flag}: {e}') from None
  pipeline_lib.check_seed(args.seed, '--seed')
  if args.seconds is not None and not (
      math.isfinite(args.seconds) and 0 < args.seconds <= pipeline_lib.MAX_SECONDS):
    raise ValueError(f'--seconds {args.seconds:g}: seconds must be in (0, '
                     f'{pipeline_lib.MAX_SECONDS:g}]')
  outputs = _outputs(args.out, args.batch)
  for path in outputs:
    _check_writable(path)
    _check_writable(os.path.splitext(path)[0] + '.png')
  mesh_shape = pipeline_lib.parse_mesh_shape(args.mesh_shape)
  # Fail on unreadable inputs before the (slow) load.
  for flag, path in (('--melody', args.melody), ('--continue', args.continuation)):
    if path is not None and not os.path.isfile(path):
      raise ValueError(f'{flag} {path}: no such file')

  setup_compilation_cache()
  pipe = pipeline_lib.Pipeline.load(args.checkpoint, mesh_shape=mesh_shape)
  result = pipe.generate_tokens(
      args.prompt, args.seconds, melody=args.melody, continuation=args.continuation,
      story=story, seed=args.seed, num_samples=args.batch,
      guidance_scale=args.guidance_scale, temperatures=temperatures, top_k=args.top_k,
      progress=not args.no_progress)
  title = args.prompt or args.story or f'continuation of {args.continuation}'
  for i, path in enumerate(outputs):
    save_wav(path, result.audio[i], pipe.sample_rate)
    png = os.path.splitext(path)[0] + '.png'
    save_spectrogram(png, result.audio[i], pipe.sample_rate,
                     title=f'{title[:100]} (seed {args.seed}' +
                     (f', sample {i + 1})' if len(outputs) > 1 else ')'),
                     marks_seconds=result.boundaries_seconds)
    print(f'wrote {path} ({result.audio.shape[1] / pipe.sample_rate:.2f} s) and {png}')
  print(speed_summary(result, pipe.sample_rate))
  return 0


def speed_summary(result, sample_rate: int) -> str:
  """One line: tokens/s per stage and compute seconds per second of audio (compiles included)."""
  parts = []
  for stage in ('semantic', 'coarse', 'fine'):
    seconds, tokens = result.timings.get(stage, 0.0), result.tokens.get(stage, 0)
    rate = f'{tokens / seconds:,.0f} tok/s' if seconds > 0 else '-'
    parts.append(f'{stage} {tokens:,} tokens in {seconds:.1f} s ({rate})')
  parts.append(f"codec decode {result.timings.get('codec_decode', 0.0):.1f} s")
  audio_seconds = result.audio.shape[0] * result.audio.shape[1] / sample_rate
  total = sum(result.timings.values())
  per = f'{total / audio_seconds:.2f}' if audio_seconds else '-'
  return (f'speed: {"; ".join(parts)}; total {total:.1f} s for {audio_seconds:.1f} s of audio '
          f'({per} s of compute per second of audio, compilation included)')


def main(argv: Optional[Sequence[str]] = None) -> int:
  return sample_main(sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
  sys.exit(main())
