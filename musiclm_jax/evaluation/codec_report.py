"""`musiclm-jax codec_report`: what a codec keeps, level by level, beside Opus, on any audio.

  musiclm-jax codec_report --codec musiclm_jax/pretrained/tiny --audio_dir ~/my_music \
      --out_dir runs/codec_report [--num_clips 20] [--seconds 10] [--fad]
  musiclm-jax codec_report --codec runs/tiny/codec --tfds_split test --out_dir runs/codec_report

`--codec` is a codec directory (codec.json), a pipeline folder (its codec part) or a codec
training run (config.gin + checkpoints/, its latest step). The clips are the first `--seconds`
of each file of a folder (any depth; resampled to the codec's rate, downmixed), or the embedded
corpus's split (`--tfds_split`, built with `musiclm-jax build_data`).

Written to `--out_dir`: report.md (the tables), report.json (every figure) and levels.png (mel
distance against levels, Opus at 6 and 12 kbps as lines). The rows:

  levels n = 1..N   encode with n RVQ levels, decode: multi-scale mel distance (lower is
                    better), its gain over n - 1 levels, SI-SNR, the latent's relative
                    quantization error ||z - q_n|| / ||z||, and each level's code usage and
                    perplexity (all levels encoded);
  no codes (n = 0)  the decoder of an all-zero latent: what it makes from no information;
  latent, no RVQ    the encoder-decoder pair alone (the codec's ceiling);
  latent, time mean the decoder of each clip's latent averaged over time (a constant input):
                    when it scores like the codec, the decoder is not using the latent;
  latent + noise    the latent plus Gaussian noise of 5% / 20% of its RMS: how far the output
                    moves when the latent does;
  Opus 6 / 12 kbps  opusenc --hard-cbr (Debian's opus-tools; left out, saying so, without it).

With `--fad`, each row also has a musicnn FAD against the clips themselves (the first half of
the clips as reference, the row's second half as evaluated; the "input" row is the floor).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from musiclm_jax.audio import io as audio_io
from musiclm_jax.audio import opus
from musiclm_jax.codec import losses
from musiclm_jax.common import atomic
from musiclm_jax.data.audio_folder import scan_audio
from musiclm_jax.generate import export
from musiclm_jax.nn.quantizer import STATE_COLLECTION

OPUS_KBPS = (6.0, 12.0)
NOISE_FRACTIONS = (0.05, 0.2)
# A level "helps" when it lowers the mel distance by at least this much (log10 per band; 0.001 is
# about 0.02 dB): smaller changes are rounding, not information.
MIN_GAIN = 1e-3


class CodecReportError(ValueError):
  """Bad input for the report (no codec there, no audio): the message names it."""


@dataclasses.dataclass
class Row:
  """One line of the report: a system and its scores (nan where not measured)."""
  name: str
  kbps: float
  mel_distance: float
  si_snr_db: float
  fad: float = float('nan')
  levels: Optional[int] = None
  gain: float = float('nan')
  latent_error: float = float('nan')
  usage: float = float('nan')
  perplexity: float = float('nan')


# ---------------------------------------------------------------------------------------------
# Inputs.


def load_codec(path: str, step: Optional[int] = None) -> tuple[Any, dict[str, Any], str]:
  """(SoundStream, its variables, a description) of a codec dir, pipeline folder or codec run.

  `step` picks a checkpoint of a codec run (default its latest); a frozen folder has one.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, 'pipeline.json')):
    with open(os.path.join(path, 'pipeline.json')) as f:
      part = (json.load(f).get('parts') or {}).get('codec', 'codec')
    path = os.path.join(path, part)
  if os.path.isfile(os.path.join(path, export.CODEC_RECORD)):
    if step is not None:
      raise CodecReportError(f'--step {step}: {path} is a frozen codec with one set of weights; '
                             '--step picks a checkpoint of a codec training run')
    generator, variables = export.load_codec_dir(path)
    return generator, variables, f'codec directory {path}'
  if os.path.isfile(os.path.join(path, 'config.gin')):
    # A training run: rebuilt from its operative config (this parses it into gin).
    from musiclm_jax.codec.model import load_codec as load_codec_run  # pylint: disable=g-import-not-at-top
    model, params, model_state, step = load_codec_run(path, step)
    return (model.generator, model.generator_variables(params, model_state),
            f'codec run {path} step {step}')
  raise CodecReportError(f'--codec {path}: neither a codec directory ({export.CODEC_RECORD}), '
                         'a pipeline folder (pipeline.json) nor a codec run (config.gin)')


def folder_clips(folder: str, sample_rate: int, seconds: float, num_clips: int) -> np.ndarray:
  """The first `seconds` of up to `num_clips` audio files under `folder` (shorter files are
  skipped, unreadable ones too, each counted): float32 [clips, samples]."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise CodecReportError(f'--audio_dir {folder}: no such folder')
  samples = int(round(seconds * sample_rate))
  clips, skipped = [], {}
  for rel in scan_audio(folder):
    if len(clips) >= num_clips:
      break
    try:
      wav = audio_io.load_audio(os.path.join(folder, rel), sample_rate, duration_s=seconds)
    except Exception as e:  # pylint: disable=broad-except
      skipped[rel] = f'unreadable ({type(e).__name__})'
      continue
    if len(wav) < samples:
      skipped[rel] = f'shorter than {seconds:g} s'
      continue
    clips.append(wav[:samples])
  for rel, why in skipped.items():
    print(f'codec_report: skipped {rel}: {why}', file=sys.stderr)
  if not clips:
    raise CodecReportError(f'--audio_dir {folder}: no readable audio file of at least '
                           f'{seconds:g} s ({len(skipped)} skipped)')
  return np.stack(clips).astype(np.float32)


def corpus_clips(split: str, tfds_data_dir: Optional[str], seconds: float, num_clips: int,
                 sample_rate: int) -> np.ndarray:
  """The first `seconds` of the embedded corpus's first `num_clips` clips of `split`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # TF only for this input
  from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder('embedded_music/default', data_dir=tfds_data_dir)
  if not builder.is_prepared():
    raise CodecReportError('the embedded corpus is not built: run `musiclm-jax build_data '
                           '--gin_file=data/embedded_music.gin` (or pass --audio_dir)')
  ds = builder.as_dataset(split=split, shuffle_files=False).take(num_clips)
  samples = int(round(seconds * sample_rate))
  return np.stack([ex['audio'][:samples].astype(np.float32) / 32768.0
                   for ex in tfds.as_numpy(ds)])


# ---------------------------------------------------------------------------------------------
# The measurements.


def _codec_functions(generator) -> dict[str, Callable]:
  """Jitted pieces, each taking the variables first (arguments, not baked-in constants): encode
  to the latent and all codes, the quantized latent of the first n levels, decode a latent."""
  levels = generator.num_levels

  def latent_and_codes(variables, audio):
    z = generator.apply(variables, audio, method=lambda m, a: m.encoder(m._pad_to_hops(a)))  # pylint: disable=protected-access
    codes = generator.apply(variables, z, method=lambda m, x: m.quantizer.encode(x, levels))
    return z, codes

  def quantized(variables, codes, n):
    # Levels from n on set to -1 contribute nothing: one compiled shape for every n.
    masked = jnp.where(jnp.arange(levels) < n, codes, -1)
    return generator.apply(variables, masked, method=lambda m, c: m.quantizer.decode(c))

  def decode(variables, z):
    return generator.apply(variables, z, method=lambda m, x: m.decoder(x))

  return {'latent_and_codes': jax.jit(latent_and_codes), 'quantized': jax.jit(quantized),
          'decode': jax.jit(decode)}


def metrics_fn(sample_rate: int) -> Callable:
  """Jitted (reference, estimate) -> (per-example mel distance, per-example SI-SNR)."""
  return jax.jit(lambda ref, est: (losses.multi_scale_mel_distance(ref, est,
                                                                   sample_rate=sample_rate),
                                   losses.si_snr(ref, est)))


def measure(generator, variables, clips: np.ndarray, batch: int = 4,
            progress: bool = True) -> dict[str, Any]:
  """Reconstructions and codec statistics of `clips` (see the module docstring).

  Returns:
    {'reconstructions': {row name: float32 [clips, samples]}, 'latent_error': [levels],
     'usage': [levels], 'perplexity': [levels], 'levels': N}.
  """
  fns = _codec_functions(generator)
  variables = jax.device_put(variables)
  levels = generator.num_levels
  samples = clips.shape[1]
  names = ([f'levels {n}' for n in range(levels + 1)] + ['latent, no RVQ', 'latent, time mean']
           + [f'latent + {int(f * 100)}% noise' for f in NOISE_FRACTIONS])
  out = {name: [] for name in names}
  counts = np.zeros((levels, generator.codebook_size), np.int64)
  err_sq = np.zeros(levels)
  latent_sq = 0.0
  rng = np.random.default_rng(0)
  for start in tqdm(range(0, len(clips), batch), desc='codec_report', unit='batch',
                    disable=not progress):
    audio = jnp.asarray(clips[start:start + batch])
    z, codes = fns['latent_and_codes'](variables, audio)
    counts += np.asarray(losses.code_counts(codes, generator.codebook_size))
    latent_sq += float(jnp.sum(jnp.square(z)))
    for n in range(levels + 1):
      q = fns['quantized'](variables, codes, n)
      if n:
        err_sq[n - 1] += float(jnp.sum(jnp.square(z - q)))
      out[f'levels {n}'].append(np.asarray(fns['decode'](variables, q))[:, :samples])
    out['latent, no RVQ'].append(np.asarray(fns['decode'](variables, z))[:, :samples])
    mean = jnp.broadcast_to(jnp.mean(z, axis=1, keepdims=True), z.shape)
    out['latent, time mean'].append(np.asarray(fns['decode'](variables, mean))[:, :samples])
    rms = float(jnp.sqrt(jnp.mean(jnp.square(z))))
    for f in NOISE_FRACTIONS:
      noise = jnp.asarray(rng.standard_normal(z.shape), jnp.float32) * (f * rms)
      out[f'latent + {int(f * 100)}% noise'].append(
          np.asarray(fns['decode'](variables, z + noise))[:, :samples])
  usage, perplexity = losses.code_statistics_from_counts(jnp.asarray(counts))
  return {'reconstructions': {k: np.concatenate(v) for k, v in out.items()},
          'latent_error': np.sqrt(err_sq / max(latent_sq, 1e-12)),
          'usage': np.asarray(usage), 'perplexity': np.asarray(perplexity), 'levels': levels}


def score(metric_fn, clips: np.ndarray, estimates: np.ndarray, batch: int) -> tuple[float, float]:
  """(mean mel distance, mean SI-SNR dB) of `estimates` against `clips`, `batch` rows a call."""
  dist, snr = [], []
  for i in range(0, len(clips), batch):
    d, s = metric_fn(jnp.asarray(clips[i:i + batch]), jnp.asarray(estimates[i:i + batch]))
    dist.append(np.asarray(d))
    snr.append(np.asarray(s))
  return float(np.mean(np.concatenate(dist))), float(np.mean(np.concatenate(snr)))


def report(generator, variables, clips: np.ndarray, *, batch: int = 4, fad: bool = False,
           with_opus: bool = True, progress: bool = True) -> dict[str, Any]:
  """Every row of the module docstring, scored on `clips` float32 [clips, samples]."""
  rate = int(generator.sample_rate)
  measured = measure(generator, variables, clips, batch, progress)
  metric_fn = metrics_fn(rate)
  systems = dict(measured['reconstructions'])
  opus_note = None
  if with_opus and opus.available():
    for kbps in OPUS_KBPS:
      systems[f'Opus {kbps:g} kbps'] = np.stack([opus.roundtrip(c, rate, kbps) for c in clips])
  elif with_opus:
    opus_note = 'opusenc / opusdec not found (apt-get install opus-tools): Opus rows left out'

  fad_of = None
  if fad:
    from musiclm_jax.evaluation import frechet  # pylint: disable=g-import-not-at-top  # TF checkpoint reader, only with --fad
    from musiclm_jax.evaluation import musicnn  # pylint: disable=g-import-not-at-top
    if len(clips) < 4:
      raise CodecReportError(f'--fad needs at least 4 clips, got {len(clips)}')
    embedder = musicnn.default_embedder()
    half = len(clips) // 2
    reference = embedder.clip_outputs(list(clips[:half])).embeddings

    def fad_of(estimates):  # pylint: disable=function-redefined
      return float(frechet.fad(reference, embedder.clip_outputs(
          list(estimates[half:2 * half])).embeddings))

  levels = measured['levels']
  bits_per_level = generator.bitrate(1) / 1000.0
  rows = [Row('input itself', float('nan'), *score(metric_fn, clips, clips, batch),
              fad=fad_of(clips) if fad_of else float('nan'))]
  previous = None
  for name, estimates in systems.items():
    dist, snr = score(metric_fn, clips, estimates, batch)
    row = Row(name, float('nan'), dist, snr, fad=fad_of(estimates) if fad_of else float('nan'))
    if name.startswith('levels '):
      n = int(name.split()[1])
      row.levels, row.kbps = n, n * bits_per_level
      row.name = f'{n} level{"s" if n != 1 else ""}' if n else 'no codes (zero latent)'
      if previous is not None:
        row.gain = previous - dist
      previous = dist
      if n:
        row.latent_error = float(measured['latent_error'][n - 1])
        row.usage = float(measured['usage'][n - 1])
        row.perplexity = float(measured['perplexity'][n - 1])
    elif name.startswith('Opus'):
      row.kbps = float(name.split()[1])
    rows.append(row)
  level_rows = [r for r in rows if r.levels]
  gains = [r.gain for r in level_rows]
  return {'rows': [dataclasses.asdict(r) for r in rows], 'num_clips': int(len(clips)),
          'seconds': clips.shape[1] / rate, 'sample_rate': rate, 'levels': levels,
          'every_level_helps': bool(all(g >= MIN_GAIN for g in gains)),
          'levels_that_help': [r.levels for r in level_rows if r.gain >= MIN_GAIN],
          'opus_note': opus_note}


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt(x: float, digits: int = 3) -> str:
  return '-' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


def markdown(result: dict[str, Any], title: str) -> str:
  """report.md: the levels table and the reference rows."""
  rows = result['rows']
  fad = any(np.isfinite(r['fad']) for r in rows)
  lines = [f'# Codec report: {title}', '',
           f'{result["num_clips"]} clips of {result["seconds"]:g} s at '
           f'{result["sample_rate"]} Hz. Mel distance: multi-scale log-mel distance (log10 per '
           'band, lower is better); gain: its drop from one level fewer.', '',
           '| levels | kbps | mel distance | gain | SI-SNR dB | latent error | code usage | '
           'perplexity |' + (' FAD |' if fad else ''),
           '|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if fad else '')]
  for r in rows:
    if r['levels'] is None:
      continue
    lines.append(f'| {r["levels"]} | {_fmt(r["kbps"], 2)} | {_fmt(r["mel_distance"])} | '
                 f'{_fmt(r["gain"])} | {_fmt(r["si_snr_db"], 1)} | '
                 f'{_fmt(r["latent_error"] * 100, 1) if np.isfinite(r["latent_error"]) else "-"}'
                 f'{"%" if np.isfinite(r["latent_error"]) else ""} | {_fmt(r["usage"], 2)} | '
                 f'{_fmt(r["perplexity"], 0)} |' + (f' {_fmt(r["fad"], 2)} |' if fad else ''))
  lines += ['', '| reference | kbps | mel distance | SI-SNR dB |' + (' FAD |' if fad else ''),
            '|---|---:|---:|---:|' + ('---:|' if fad else '')]
  for r in rows:
    if r['levels'] is not None:
      continue
    lines.append(f'| {r["name"]} | {_fmt(r["kbps"], 1)} | {_fmt(r["mel_distance"])} | '
                 f'{_fmt(r["si_snr_db"], 1)} |' + (f' {_fmt(r["fad"], 2)} |' if fad else ''))
  helps = result['levels_that_help']
  lines += ['', f'Levels that lower the mel distance by at least {MIN_GAIN:g}: {helps} of '
            f'1..{result["levels"]}'
            + (' (every one).' if result['every_level_helps'] else '.')]
  if result.get('opus_note'):
    lines += ['', result['opus_note']]
  return '\n'.join(lines) + '\n'


def plot(result: dict[str, Any], path: str, title: str) -> None:
  """levels.png: mel distance against levels, the no-RVQ ceiling and Opus as lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # plotting only when writing a report
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result['rows']
  level_rows = [r for r in rows if r['levels']]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r['levels'] for r in level_rows], [r['mel_distance'] for r in level_rows], 'o-',
          label='codec, n levels')
  references = [r for r in rows if r['name'].startswith('Opus')
                or r['name'] in ('latent, no RVQ', 'latent, time mean')]
  styles = {'latent, no RVQ': ('tab:green', '--'), 'latent, time mean': ('tab:red', ':')}
  for r in references:
    color, style = styles.get(r['name'], ('black', '-.' if '6' in r['name'] else '--'))
    ax.axhline(r['mel_distance'], linestyle=style, color=color, label=r['name'])
  ax.set_xlabel('RVQ levels')
  ax.set_ylabel('multi-scale mel distance (lower is better)')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(result: dict[str, Any], out_dir: str, title: str) -> dict[str, str]:
  """report.json, report.md and levels.png in `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, n) for k, n in (('json', 'report.json'),
                                                     ('markdown', 'report.md'),
                                                     ('plot', 'levels.png'))}

  def writer(text: str) -> Callable[[str], None]:
    def write_text(tmp: str) -> None:
      with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    return write_text

  atomic.write_atomically(paths['json'], writer(json.dumps(
      {**result, 'title': title}, indent=2, allow_nan=True)), suffix='.json')
  atomic.write_atomically(paths['markdown'], writer(markdown(result, title)), suffix='.md')
  atomic.write_atomically(paths['plot'], lambda tmp: plot(result, tmp, title), suffix='.png')
  return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='musiclm-jax codec_report', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--codec', required=True,
                      help='codec directory, pipeline folder or codec training run')
  parser.add_argument('--step', type=int, default=None,
                      help="a codec run's checkpoint step (default: its latest)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--audio_dir', help='a folder of audio files (any depth)')
  source.add_argument('--tfds_split', help="the embedded corpus's split, e.g. test")
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--num_clips', type=int, default=20)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--fad', action='store_true', help='also musicnn FAD of every row')
  parser.add_argument('--no_opus', action='store_true', help='leave the Opus rows out')
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--no_progress', action='store_true')
  args = parser.parse_args(argv)
  try:
    if args.num_clips < 1 or args.batch < 1 or not 0 < args.seconds <= 600:
      raise CodecReportError('--num_clips and --batch must be positive, --seconds in (0, 600]')
    generator, variables, title = load_codec(args.codec, args.step)
    if STATE_COLLECTION not in variables:
      raise CodecReportError(f'--codec {args.codec}: no RVQ codebooks in its variables')
    rate = int(generator.sample_rate)
    if args.audio_dir:
      clips = folder_clips(args.audio_dir, rate, args.seconds, args.num_clips)
    else:
      clips = corpus_clips(args.tfds_split, args.tfds_data_dir, args.seconds, args.num_clips,
                           rate)
    result = report(generator, variables, clips, batch=args.batch, fad=args.fad,
                    with_opus=not args.no_opus, progress=not args.no_progress)
  except (CodecReportError, FileNotFoundError, ValueError) as e:
    print(f'musiclm-jax codec_report: error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  paths = write(result, args.out_dir, title)
  print(markdown(result, title))
  print(f'Written: {paths["markdown"]}, {paths["json"]}, {paths["plot"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
