"""`musiclm-jax train_pipeline --gin_file=pipelines/tiny.gin`: every part of a pipeline, in order.

A recipe is a list of `Step`s, each one `musiclm-jax` command (train, fit_kmeans, tokenize, ...)
with its own gin files and bindings, run as a subprocess (a fresh JAX and gin per part) under
one root folder:

  ROOT/<output>          what each step makes (a run directory, a tokenizer, a token cache, ...)
  ROOT/logs/<step>.log   the step's whole console output (also shown live)
  ROOT/recipe.json       every step's command, status, exit code and wall time, the git commit;
                         rewritten atomically after each step
  ROOT/recipe.md         the same as a table
  ROOT/.done/<step>.json a step's completion record, written only after it exited with status 0

Running the recipe again skips the steps already done (their completion record exists, or, for a
step whose command writes its output atomically, the output exists) and starts the others again:
an interrupted `train` step resumes from its latest checkpoint (the trainer does that in the same
MODEL_DIR), and commands that write their output atomically (fit_kmeans, fit_conditioner,
tokenize, assemble_pipeline) left nothing half-written to trip over. A failed step stops the
recipe (later steps need its output) with the log's path; nothing written before is touched.

Step bindings are gin binding texts; `{root}` in them is replaced by ROOT, so a recipe's parts
find each other, e.g. `{'MODEL_DIR': "'{root}/codec'"}`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import gin

from musiclm_jax.common import atomic

logger = logging.getLogger(__name__)

RECORD = 'recipe.json'
TABLE = 'recipe.md'
DONE_DIR = '.done'
LOG_DIR = 'logs'
KINDS = ('train', 'atomic', 'rerun')


class RecipeError(RuntimeError):
  """A recipe that cannot run: a bad step definition or a step that failed."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Step:
  """One part of a recipe: a `musiclm-jax` command and its configuration.

  Attributes:
    name: the step's name (unique in the recipe; names its log and completion record).
    command: the `musiclm-jax` subcommand ('train', 'fit_kmeans', 'tokenize', 'eval', ...).
    gin_files: its --gin_file arguments.
    bindings: its --gin.NAME=VALUE bindings, values as gin text ("'{root}/codec'", 3000);
      `{root}` becomes the recipe's root.
    output: the path (relative to the root, `{root}` allowed) of what the step makes.
    kind: 'train' (done only once its completion record exists; an interrupted run resumes from
      its checkpoints), 'atomic' (the command writes `output` atomically: its existence means
      done), 'rerun' (cheap and idempotent, e.g. build_data of an already built corpus: always
      run).
    budget_minutes: the wall time the step is sized for (reported beside the measured one; the
      training steps stop themselves through train.time_limit_seconds).
    module: the module run with `python -m` (default the `musiclm-jax` CLI); another one (e.g.
      'musiclm_jax.evaluation.attributes') takes `args` instead of a command and gin.
    args: plain arguments after the command (`{root}` allowed).
  """
  name: str = gin.REQUIRED
  command: Optional[str] = None
  gin_files: Sequence[str] = ()
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  output: Optional[str] = None
  kind: str = 'train'
  budget_minutes: Optional[float] = None
  module: str = 'musiclm_jax.main'
  args: Sequence[str] = ()

  def check(self) -> None:
    if self.kind not in KINDS:
      raise RecipeError(f'step {self.name!r}: kind {self.kind!r} is not one of {KINDS}')
    if self.module == 'musiclm_jax.main' and not self.command:
      raise RecipeError(f'step {self.name!r}: give the musiclm-jax command (Step.command)')
    if self.kind == 'atomic' and not self.output:
      raise RecipeError(f'step {self.name!r}: an atomic step needs an output path')
    if not self.name or '/' in self.name or self.name.startswith('.'):
      raise RecipeError(f'step name {self.name!r}: give a plain name (no "/", no leading ".")')

  def resolve(self, root: str) -> 'Step':
    """The step with `{root}` replaced in its bindings and output."""
    bindings = {k: (v.replace('{root}', root) if isinstance(v, str) else v)
                for k, v in self.bindings.items()}
    output = self.output.replace('{root}', root) if self.output else None
    if output and not os.path.isabs(output) and not output.startswith(root):
      output = os.path.join(root, output)
    args = [a.replace('{root}', root) for a in self.args]
    return dataclasses.replace(self, bindings=bindings, output=output, args=args)

  def argv(self) -> list[str]:
    """The arguments of the step after `python -m MODULE`."""
    args = ([self.command] if self.command else []) + [f'--gin_file={f}' for f in self.gin_files]
    for key, value in self.bindings.items():
      text = value if isinstance(value, str) else repr(value)
      args.append(f'--gin.{key}={text}')
    return args + list(self.args)

  def display(self) -> str:
    """The step's command line as a user would type it."""
    program = (['musiclm-jax'] if self.module == 'musiclm_jax.main' else
               ['python', '-m', self.module])
    return shlex.join(program + self.argv())


def _git_commit() -> Optional[str]:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                         timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def _tee(pipe, sinks) -> None:
  """Copies a child's output to every sink (the console and the log) as it comes."""
  while True:
    chunk = os.read(pipe.fileno(), 65536)
    if not chunk:
      break
    for sink in sinks:
      sink.write(chunk)
      sink.flush()


def run_step(step: Step, log_path: str, python: str = sys.executable,
             echo: bool = True) -> tuple[int, float]:
  """Runs one resolved step as `python -m musiclm_jax.main ...`; (exit status, wall seconds)."""
  cmd = [python, '-m', step.module] + step.argv()
  start = time.perf_counter()
  with open(log_path, 'ab') as log:
    log.write(f'\n$ {shlex.join(cmd)}\n'.encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sinks = [log] + ([sys.stderr.buffer] if echo else [])
    reader = threading.Thread(target=_tee, args=(proc.stdout, sinks), daemon=True)
    reader.start()
    try:
      status = proc.wait()
    except KeyboardInterrupt:
      proc.terminate()  # the trainer saves a checkpoint on SIGTERM
      proc.wait()
      raise
    finally:
      reader.join(timeout=30)
  return status, time.perf_counter() - start


def _table(record: Mapping[str, Any]) -> str:
  lines = ['| step | command | status | minutes | budget |', '|---|---|---|---:|---:|']
  total = 0.0
  for s in record['steps']:
    minutes = s.get('wall_seconds')
    minutes = None if minutes is None else minutes / 60
    total += minutes or 0.0
    budget = s.get('budget_minutes')
    lines.append(f'| {s["name"]} | {s["command"]} | {s["status"]} | '
                 f'{"" if minutes is None else f"{minutes:.1f}"} | '
                 f'{"" if budget is None else f"{budget:g}"} |')
  lines.append(f'| **total (this invocation\'s runs and earlier ones)** | | | {total:.1f} | |')
  return '\n'.join(lines) + '\n'


def apply_overrides(steps: Sequence[Step],
                    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    train_overrides: Optional[Mapping[str, Any]] = None) -> list[Step]:
  """The steps with `train_overrides` on every 'train' step, then `overrides` by name."""
  names = [s.name for s in steps]
  unknown = sorted(set(overrides or {}) - set(names))
  if unknown:
    raise RecipeError(f'train_pipeline.overrides names no step: {unknown} (steps: {names})')
  out = []
  for step in steps:
    bindings = dict(step.bindings)
    if step.command == 'train':
      bindings.update(train_overrides or {})
    bindings.update((overrides or {}).get(step.name, {}))
    out.append(dataclasses.replace(step, bindings=bindings))
  return out


@gin.configurable
def train_pipeline(root: str = gin.REQUIRED,
                   steps: Sequence[Step] = gin.REQUIRED,
                   only: Optional[Sequence[str]] = None,
                   dry_run: bool = False,
                   max_part_minutes: Optional[float] = 60.0,
                   overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   train_overrides: Optional[Mapping[str, Any]] = None,
                   python: str = sys.executable) -> dict[str, Any]:
  """Runs a recipe's steps in order under `root` (module docstring); returns the record.

  Args:
    root: the folder every step's output lives under.
    steps: the recipe (gin: `[@codec/Step(), @w2v_bert/Step(), ...]`).
    only: run just these steps (by name; the others are neither run nor checked), e.g. to
      redo one part after deleting its output.
    dry_run: print each step's command and whether it would run, run nothing.
    max_part_minutes: a part that took longer is reported (the recipe's time promise).
    overrides: {step name: {binding: value}} added to (or replacing) those steps' bindings,
      e.g. a smoke run's smaller NUM_EXAMPLES (pipelines/tiny_smoke.gin).
    train_overrides: {binding: value} for every step whose command is 'train' (e.g.
      {'TRAIN_STEPS': 4}), applied before `overrides`.
    python: the interpreter that runs `-m musiclm_jax.main`.

  Raises:
    RecipeError: a bad step list, or a step that exited with a non-zero status.
  """
  steps = [s.resolve(root) for s in apply_overrides(steps, overrides, train_overrides)]
  names = [s.name for s in steps]
  for s in steps:
    s.check()
  if len(set(names)) != len(names):
    raise RecipeError(f'step names repeat: {names}')
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise RecipeError(f'train_pipeline.only names no step: {unknown} (steps: {names})')
  os.makedirs(os.path.join(root, DONE_DIR), exist_ok=True)
  os.makedirs(os.path.join(root, LOG_DIR), exist_ok=True)
  record_path = os.path.join(root, RECORD)
  previous = {}
  if os.path.exists(record_path):
    with open(record_path) as f:
      previous = {s['name']: s for s in json.load(f).get('steps', [])}
  record = {'root': root, 'git_commit': _git_commit(), 'python': python, 'steps': []}
  for s in steps:
    entry = dict(previous.get(s.name, {}))
    entry.update(name=s.name, command=s.command or s.module, command_line=s.display(),
                 output=s.output, kind=s.kind, budget_minutes=s.budget_minutes)
    entry.setdefault('status', 'pending')
    record['steps'].append(entry)

  def save():
    atomic.write_json(record_path, record)
    with open(os.path.join(root, TABLE), 'w') as f:
      f.write(f'# Recipe under `{root}` (git {record["git_commit"]})\n\n' + _table(record))

  skipped = 0
  for s, entry in zip(steps, record['steps']):
    if only is not None and s.name not in only:
      continue
    done_path = os.path.join(root, DONE_DIR, f'{s.name}.json')
    done = os.path.exists(done_path)
    if not done and s.kind == 'atomic' and os.path.exists(s.output):
      done = True  # written atomically by a run that ended before its record
    if done and s.kind != 'rerun':
      skipped += 1
      logger.info('%s: done already, skipped (%s)', s.name,
                  done_path if os.path.exists(done_path) else s.output)
      print(f'[recipe] {s.name}: done, skipped', file=sys.stderr)
      if entry['status'] != 'done':
        entry['status'] = 'done'
      continue
    line = s.display()
    if dry_run:
      print(f'[recipe] {s.name} would run: {line}')
      continue
    resumed = s.kind == 'train' and entry.get('status') in ('running', 'failed', 'interrupted')
    print(f'[recipe] {s.name}: {"resuming" if resumed else "running"}: {line}', file=sys.stderr)
    entry.update(status='running', started=datetime.datetime.now().isoformat(timespec='seconds'))
    save()
    log_path = os.path.join(root, LOG_DIR, f'{s.name}.log')
    try:
      status, seconds = run_step(s, log_path, python)
    except KeyboardInterrupt:
      entry['status'] = 'interrupted'
      save()
      raise
    entry['exit_status'] = status
    entry['wall_seconds'] = entry.get('wall_seconds_before', 0.0) + seconds
    if status != 0:
      entry['status'] = 'failed'
      entry['wall_seconds_before'] = entry['wall_seconds']
      save()
      raise RecipeError(f'step {s.name!r} failed with exit status {status}; its output is in '
                        f'{log_path}; fix the cause and run the recipe again (the steps done '
                        'are skipped, an interrupted training resumes)')
    entry['status'] = 'done'
    entry['finished'] = datetime.datetime.now().isoformat(timespec='seconds')
    entry.pop('wall_seconds_before', None)
    atomic.write_json(done_path, entry)
    save()
    minutes = entry['wall_seconds'] / 60
    if max_part_minutes is not None and minutes > max_part_minutes:
      logger.warning('%s took %.1f minutes, over the recipe\'s %g-minute limit per part',
                     s.name, minutes, max_part_minutes)
    print(f'[recipe] {s.name}: done in {minutes:.1f} min', file=sys.stderr)
  if not dry_run:
    save()
    print(f'[recipe] {len(steps)} steps, {skipped} skipped as done; record: {record_path}\n'
          + _table(record), file=sys.stderr)
  return record
