"""The tiny pipeline's quality table: an eval folder's metrics against the project's targets.

    python -m musiclm_jax.evaluation.quality EVAL_DIR [--out quality.md]

Reads EVAL_DIR/metrics.json (`musiclm-jax eval`, pipeline_eval.py) and prints one Markdown row
per target, with the measured values and whether the target is met:

  attributes  mean balanced attribute accuracy of the generated clips >= 70% of the real-audio
              ceiling, and well above the shuffled-caption floor: at least FLOOR_MARGIN (0.10)
              above it (the mean over the attributes the classifier reads: instrument, tempo,
              key, mode, drums, dynamics)
  FAD         musicnn FAD of generated vs real clips <= 3 x the real-vs-real floor (two halves of
              the split)
  codec       the codec's multi-scale mel distance on the split's clips below Opus at 6 kbps on
              the same clips (the eval's 'opus_6kbps' row; not met when the eval has none)
  melody      chroma melody adherence of hum-conditioned generation above the same caption
              without the hum (skipped with the eval's reason when the pipeline has no melody
              conditioning: then the target is not met)
  instrument  prompts that name one instrument (the eval's 'instrument_prompts' section, when it
              has one): the instrument named is the one the classifier hears in >= 70% of the
              real clips' rate and at least FLOOR_MARGIN above the chance floor

Exit status 0 whatever the verdicts (the table is the product); 2 for an unreadable folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

ATTRIBUTE_RATIO = 0.7
FLOOR_MARGIN = 0.10
FAD_RATIO = 3.0


def _mean(values) -> Optional[float]:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def quality_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
  """[{target, measured, threshold, met}] from an eval's metrics.json (module docstring)."""
  rows = []
  balanced = (metrics.get('attributes') or {}).get('balanced_accuracy') or {}
  ceiling = _mean((balanced.get('real_ceiling') or {}).values())
  generated = _mean((balanced.get('generated') or {}).values())
  floor = _mean((balanced.get('shuffled_floor') or {}).values())
  if None in (ceiling, generated, floor):
    rows.append({'target': 'attribute accuracy', 'measured': 'not in the eval',
                 'threshold': '', 'met': False})
  else:
    need = max(ATTRIBUTE_RATIO * ceiling, floor + FLOOR_MARGIN)
    rows.append({
        'target': f'attribute accuracy (balanced, mean of {len(balanced["generated"])}) >= '
                  f'{ATTRIBUTE_RATIO:.0%} of real and >= floor + {FLOOR_MARGIN:.2f}',
        'measured': f'generated {generated:.3f}; real {ceiling:.3f} '
                    f'({generated / ceiling:.0%}); shuffled floor {floor:.3f}',
        'threshold': f'>= {need:.3f}', 'met': generated >= need})
  fad = metrics.get('fad') or {}
  if 'generated' in fad and 'real_halves_floor' in fad:
    need = FAD_RATIO * fad['real_halves_floor']
    rows.append({
        'target': f'FAD (musicnn) generated <= {FAD_RATIO:g} x real-vs-real',
        'measured': f'generated {fad["generated"]:.2f}; real halves {fad["real_halves_floor"]:.2f} '
                    f'({fad["generated"] / fad["real_halves_floor"]:.1f}x); codec resynthesis '
                    f'{fad.get("codec_resynthesis", float("nan")):.2f}',
        'threshold': f'<= {need:.2f}', 'met': fad['generated'] <= need})
  else:
    rows.append({'target': 'FAD', 'measured': 'not in the eval', 'threshold': '', 'met': False})
  systems = metrics.get('systems') or {}
  codec = (systems.get('codec_resynthesis') or {}).get('mel_distance')
  opus = (systems.get('opus_6kbps') or {}).get('mel_distance')
  if codec is None:
    rows.append({'target': 'codec mel distance < Opus 6 kbps', 'measured': 'not in the eval '
                 '(diagnostics off)', 'threshold': '', 'met': False})
  elif opus is None:
    rows.append({'target': 'codec mel distance (multi-scale log-mel) < Opus 6 kbps',
                 'measured': f'codec {codec:.3f}; Opus not measured by this eval (needs '
                             'opusenc / opusdec: Debian opus-tools)',
                 'threshold': '', 'met': False})
  else:
    rows.append({'target': 'codec mel distance (multi-scale log-mel) < Opus 6 kbps',
                 'measured': f'codec {codec:.3f}; Opus 6 kbps on the same clips {opus:.3f}',
                 'threshold': f'< {opus:.3f}', 'met': codec < opus})
  melody = metrics.get('melody') or {}
  if 'with_melody' in melody and 'text_only_floor' in melody:
    ceiling = melody.get('real_rendering_ceiling')
    rows.append({'target': 'melody adherence with the hum > without it',
                 'measured': f'with hum {melody["with_melody"]:.3f}; text only '
                             f'{melody["text_only_floor"]:.3f}' +
                             (f'; real rendering {ceiling:.3f}' if ceiling is not None else '') +
                             f' ({melody.get("clips", "?")} clips)',
                 'threshold': f'> {melody["text_only_floor"]:.3f}',
                 'met': melody['with_melody'] > melody['text_only_floor']})
  else:
    rows.append({'target': 'melody adherence with the hum > without it',
                 'measured': f'skipped: {melody.get("skipped", "not in the eval")}',
                 'threshold': '', 'met': False})
  named = metrics.get('instrument_prompts')
  if isinstance(named, dict) and 'named_accuracy' in named and 'real_accuracy' in named:
    need = max(ATTRIBUTE_RATIO * named['real_accuracy'], named['chance_floor'] + FLOOR_MARGIN)
    rows.append({
        'target': f'prompts naming one instrument: that instrument heard >= '
                  f'{ATTRIBUTE_RATIO:.0%} of real and >= floor + {FLOOR_MARGIN:.2f}',
        'measured': f'named {named["named_accuracy"]:.3f} ({named["clips"]} clips, '
                    f'{len(named["instruments"])} instruments); real {named["real_accuracy"]:.3f}'
                    f'; chance floor {named["chance_floor"]:.3f}',
        'threshold': f'>= {need:.3f}', 'met': named['named_accuracy'] >= need})
  elif isinstance(named, dict):
    rows.append({'target': 'prompts naming one instrument: that instrument heard',
                 'measured': f'skipped: {named.get("skipped", "incomplete")}',
                 'threshold': '', 'met': False})
  return rows


def quality_table(metrics: dict[str, Any], title: str = '') -> str:
  """The rows as Markdown, with a met / not met count."""
  rows = quality_rows(metrics)
  lines = ([f'### {title}', ''] if title else []) + [
      '| target | measured | threshold | met |', '|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["target"]} | {r["measured"]} | {r["threshold"]} | '
                 f'{"yes" if r["met"] else "**no**"} |')
  met = sum(r['met'] for r in rows)
  lines += ['', f'{met} of {len(rows)} targets met.']
  return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m musiclm_jax.evaluation.quality',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('eval_dir')
  parser.add_argument('--out', default=None, help='also write the table here')
  args = parser.parse_args(argv)
  path = os.path.join(args.eval_dir, 'metrics.json')
  try:
    with open(path) as f:
      metrics = json.load(f)
  except (OSError, ValueError) as e:
    print(f'quality: cannot read {path}: {e} (make it with `musiclm-jax eval`)', file=sys.stderr)
    return 2
  setup = metrics.get('setup') or {}
  title = (f'{setup.get("pipeline_dir", "?")} on {setup.get("dataset", "?")} '
           f'{setup.get("split", "?")} ({setup.get("clips", "?")} clips of '
           f'{setup.get("seconds", "?")} s)')
  table = quality_table(metrics, title)
  print(table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
