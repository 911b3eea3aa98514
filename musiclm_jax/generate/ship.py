"""`musiclm-jax ship_pipeline`: a pipeline folder copied for shipping, with a manifest.

The copy (by default into the package: musiclm_jax/pretrained/tiny, the folder `musiclm-jax
demo` and `make demo` use) holds the pipeline folder's files unchanged plus:

  manifest.json   format, every file's sha256 and size, the total, the git commit, when it was
                  shipped; `made_by`: each part's command line, status and training minutes from
                  the recipe that made it (ROOT/recipe.json of `musiclm-jax train_pipeline`);
                  `evaluation`: the summary of its `musiclm-jax eval` (the systems table, melody
                  adherence, teacher-forced diagnostics) when an eval folder is given
  configs/        each training run's operative config.gin (the gin that made the part)

It is refused when the files exceed `max_megabytes` (the repository's budget; the message names
the largest parts) and written atomically: an existing copy is replaced only with OVERWRITE and
only once the new one is complete. `musiclm_jax.data.integrity.manifest_problems(folder)`
re-hashes the files; `Pipeline.load` checks them.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from typing import Any, Optional

import gin

from musiclm_jax.data.integrity import MANIFEST, folder_files, sha256_of
from musiclm_jax.data.model_dir import write_directory_atomically

MANIFEST_FORMAT = 'musiclm_jax.shipped_pipeline/1'
CONFIG_DIR = 'configs'
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'pretrained', 'tiny')


class ShipError(ValueError):
  """A pipeline that cannot be shipped (too large, not a pipeline folder); the message says why."""


def _git_commit() -> Optional[str]:
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def evaluation_summary(eval_dir: str) -> dict[str, Any]:
  """The headline of an eval folder's metrics.json (musiclm_jax/evaluation/pipeline_eval.py)."""
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  summary: dict[str, Any] = {'systems': metrics.get('systems'), 'setup': metrics.get('setup')}
  melody = metrics.get('melody')
  if isinstance(melody, dict):
    summary['melody'] = {k: v for k, v in melody.items() if k != 'per_clip'}
  diagnostics = metrics.get('diagnostics')
  if isinstance(diagnostics, dict) and 'teacher_forced' in diagnostics:
    summary['teacher_forced'] = diagnostics['teacher_forced']
  return summary


def _recipe_summary(recipe_dir: str) -> dict[str, Any]:
  with open(os.path.join(recipe_dir, 'recipe.json')) as f:
    record = json.load(f)
  steps = [{'name': s['name'], 'command_line': s.get('command_line'), 'status': s.get('status'),
            'minutes': (None if s.get('wall_seconds') is None else
                        round(s['wall_seconds'] / 60, 2))} for s in record['steps']]
  return {'root': record.get('root'), 'git_commit': record.get('git_commit'), 'steps': steps}


def _run_configs(pipeline_dir: str) -> dict[str, str]:
  """{part: the config.gin of the training run it was exported from}, where there is one."""
  with open(os.path.join(pipeline_dir, 'pipeline.json')) as f:
    record = json.load(f)
  configs = {}
  for part, source in (record.get('sources') or {}).items():
    path = os.path.join(source, 'config.gin')
    if source and os.path.isfile(path):
      configs[part] = path
  return configs


@gin.configurable
def ship_pipeline(pipeline_dir: str = gin.REQUIRED, out_dir: Optional[str] = None,
                  recipe_dir: Optional[str] = None, eval_dir: Optional[str] = None,
                  max_megabytes: float = 60.0, overwrite: bool = False) -> dict[str, Any]:
  """Copies a pipeline folder to `out_dir` with manifest.json (module docstring).

  Args:
    pipeline_dir: the folder `assemble_pipeline` wrote.
    out_dir: where the shipped copy goes (None: DEFAULT_OUT_DIR, musiclm_jax/pretrained/tiny).
    recipe_dir: the recipe root that made it (its recipe.json), or None.
    eval_dir: its `musiclm-jax eval` folder (metrics.json), or None.
    max_megabytes: refuse a copy larger than this (10^6 bytes).
    overwrite: replace an existing `out_dir` (only once the new copy is complete).

  Returns:
    The manifest.

  Raises:
    ShipError: not a pipeline folder, or over `max_megabytes`.
    FileExistsError: `out_dir` exists and not `overwrite`.
  """
  out_dir = out_dir or DEFAULT_OUT_DIR
  if not os.path.isfile(os.path.join(pipeline_dir, 'pipeline.json')):
    raise ShipError(f'{pipeline_dir}: not a pipeline folder (no pipeline.json; make one with '
                    '`musiclm-jax assemble_pipeline`)')
  files = folder_files(pipeline_dir)
  sizes = {rel: os.path.getsize(os.path.join(pipeline_dir, rel)) for rel in files}
  configs = _run_configs(pipeline_dir)
  total = sum(sizes.values()) + sum(os.path.getsize(p) for p in configs.values())
  if total > max_megabytes * 1e6:
    parts: dict[str, int] = {}
    for rel, size in sizes.items():
      parts[rel.split(os.sep)[0]] = parts.get(rel.split(os.sep)[0], 0) + size
    largest = ', '.join(f'{p} {b / 1e6:.1f} MB' for p, b in
                        sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    raise ShipError(f'{pipeline_dir}: {total / 1e6:.1f} MB is over the {max_megabytes:g} MB '
                    f'budget (largest parts: {largest}); store the parameters as bfloat16 '
                    '(assemble_pipeline PARAMS_DTYPE) or choose smaller configs')
  manifest: dict[str, Any] = {
      'format': MANIFEST_FORMAT,
      'shipped': datetime.datetime.now().isoformat(timespec='seconds'),
      'source': os.path.abspath(pipeline_dir),
      'git_commit': _git_commit(),
  }
  if recipe_dir is not None:
    manifest['made_by'] = _recipe_summary(recipe_dir)
  if eval_dir is not None:
    manifest['evaluation'] = evaluation_summary(eval_dir)
    manifest['evaluation']['eval_dir'] = os.path.abspath(eval_dir)

  def write(staging: str) -> None:
    shutil.copytree(pipeline_dir, staging, dirs_exist_ok=True)
    if configs:
      os.makedirs(os.path.join(staging, CONFIG_DIR), exist_ok=True)
      for part, path in configs.items():
        shutil.copyfile(path, os.path.join(staging, CONFIG_DIR, f'{part}.gin'))
    listed = {}
    for rel in folder_files(staging):
      path = os.path.join(staging, rel)
      listed[rel] = {'sha256': sha256_of(path), 'bytes': os.path.getsize(path)}
    manifest['files'] = listed
    manifest['total_bytes'] = sum(e['bytes'] for e in listed.values())
    with open(os.path.join(staging, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
      f.write('\n')

  write_directory_atomically(out_dir, write, overwrite, 'OVERWRITE=True')
  print(f'shipped {pipeline_dir} -> {out_dir}: {len(manifest["files"])} files, '
        f'{manifest["total_bytes"] / 1e6:.1f} MB')
  return manifest
