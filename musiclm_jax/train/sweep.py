"""`musiclm-jax sweep`: expands a gin grid into run folders, runs them in turn, tabulates them.

  musiclm-jax sweep --gin_file=examples/toy_lm.gin --gin.TRAIN_STEPS=200 \
    --grid "OptimizerConfig.learning_rate=[1e-3, 3e-3]" --grid "SEED=[0, 1]" \
    --sweep_dir=runs/toy_lr_sweep [--dry_run] [--launch_prefix="sbatch --wrap"]

Each point of the grid's cartesian product is one run in its own folder under --sweep_dir, named
from its grid bindings (`OptimizerConfig.learning_rate=0.001,SEED=0`, sanitised), whose
MODEL_DIR is bound to that folder. Every grid name must already be a macro of the gin files or a
parameter of a configurable, and every run's config is parsed before anything is launched, so a
typo fails at once, naming the binding. The sweep prints one shell-quoted launch command per run
(after --launch_prefix, for a cluster's submit wrapper) and, unless --dry_run, runs them one
after another as subprocesses (each with a fresh JAX and gin), teeing their output to
RUN/sweep_run.log. A finished run (a checkpoint at TRAIN_STEPS, `done` in sweep.json, or for
`--command=eval` an eval_results.json) is skipped; an interrupted or failed one is launched again
and the trainer resumes from its checkpoints; a failure is recorded with its exit status and the
sweep goes on. SWEEP_DIR/sweep.json holds the grid, the runs, their commands and their status;
nothing else already written is touched. At the end the final train and eval scalars of every
run, read from its TensorBoard events, go into one Markdown table, printed and written to
SWEEP_DIR/summary.md (all final scalars in summary.json); `--summarize_only` rebuilds it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import glob
import hashlib
import importlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from musiclm_jax.common import atomic
from musiclm_jax.common.tf_setup import quiet_tensorflow

SWEEP_JSON = 'sweep.json'
RUN_LOG = 'sweep_run.log'
# Statuses in sweep.json: pending (not launched yet), running, done, failed (exit status
# recorded), interrupted (stopped by Ctrl-C: launched again next time, resuming).
DONE = 'done'
# Final scalars shown in the table (all of them go to summary.json): train tags, then every eval
# tag the run wrote.
_TRAIN_COLUMNS = (('loss', 'train loss'), ('accuracy', 'train accuracy'),
                  ('perf/steps_per_second', 'steps/s'))
_MAX_NAME = 120


class SweepError(Exception):
  """A bad flag, grid or gin binding, or a sweep folder at odds with the flags: exit status 2."""


@dataclasses.dataclass
class Run:
  """One point of the grid.

  Attributes:
    name: the run folder's name (from its grid bindings).
    bindings: grid name -> gin value text, in grid order.
    model_dir: absolute path of the run folder (bound to MODEL_DIR).
    argv: the subcommand and its flags, as `musiclm-jax` takes them.
    gin_bindings: the run's bindings (MODEL_DIR, the fixed ones, its grid point), as parsed.
    final_step: TRAIN_STEPS of the run's config (None when the config does not say).
  """
  name: str
  bindings: dict[str, str]
  model_dir: str
  argv: list[str]
  gin_bindings: list[str]
  final_step: Optional[int] = None

  def command(self, launch_prefix: str = '') -> str:
    """The shell-quoted launch command (after the prefix, taken verbatim)."""
    text = shlex.join(['musiclm-jax'] + self.argv)
    return f'{launch_prefix} {text}' if launch_prefix else text


# ----------------------------------------------------------------------------- grid


def parse_grid(spec: str) -> tuple[str, list[str]]:
  """Parses `NAME=[v1, v2, ...]` into the name and each value's gin text.

  Values are read with gin's own literal parser (no evaluation of the text): numbers, strings,
  tuples, lists, dicts, None, booleans, and @references or %macros to registered configurables.

  Raises:
    SweepError: naming the --grid flag at fault.
  """
  import gin  # pylint: disable=g-import-not-at-top
  name, sep, values_text = spec.partition('=')
  name = name.strip()
  if not sep or not name or not values_text.strip():
    raise SweepError(f'--grid {spec!r}: expected NAME=[VALUE, ...]')
  if name == 'MODEL_DIR':
    raise SweepError(f'--grid {spec!r}: the sweep binds MODEL_DIR to each run\'s folder')
  try:
    values = gin.config.parse_value(values_text.strip())
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'--grid {spec!r}: not a gin value: {str(e).splitlines()[0]}') from e
  if not isinstance(values, (list, tuple)) or not values:
    raise SweepError(f'--grid {spec!r}: expected a non-empty list of values in brackets')
  texts = [repr(v) for v in values]
  if len(set(texts)) != len(texts):
    raise SweepError(f'--grid {spec!r}: a value is repeated')
  return name, texts


def expand_grid(grid: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
  """The cartesian product of the grid: one {name: value text} per run, last name fastest."""
  names = [name for name, _ in grid]
  if len(set(names)) != len(names):
    raise SweepError(f'--grid: a name is given twice: {names}')
  return [dict(zip(names, combo)) for combo in itertools.product(*[v for _, v in grid])]


def _value_label(text: str) -> str:
  """A value's text for a folder name: strings without their quotes."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, str) else text


def _sanitise(text: str) -> str:
  text = re.sub(r'[^A-Za-z0-9._=,+-]+', '_', text).strip('_.') or 'run'
  if len(text) > _MAX_NAME:
    text = text[:_MAX_NAME - 9] + '-' + hashlib.sha1(text.encode()).hexdigest()[:8]
  return text


def run_name(bindings: dict[str, str]) -> str:
  """The run folder's name: `NAME=VALUE,NAME=VALUE` sanitised for any file system."""
  return _sanitise(','.join(f'{k}={_value_label(v)}' for k, v in bindings.items()))


def run_names(points: Sequence[dict[str, str]]) -> list[str]:
  """Folder names of all points; names that sanitise alike get a hash of their bindings."""
  names = [run_name(p) for p in points]
  counts = {n: names.count(n) for n in names}
  return [n if counts[n] == 1 else
          _sanitise(n[:_MAX_NAME - 9]) + '-' + hashlib.sha1(
              json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
          for n, p in zip(names, points)]


# ----------------------------------------------------------------------------- flags


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `--gin.NAME=VALUE` flags (as `musiclm-jax train` takes them) from the others."""
  from musiclm_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  try:
    bindings, rest = main_lib.split_gin_flags(argv)
  except main_lib.UsageError as e:
    raise SweepError(str(e)) from e
  parser = argparse.ArgumentParser(
      prog='musiclm-jax sweep', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--gin_file', action='append', default=[],
                      help='a gin file of every run (repeatable)')
  parser.add_argument('--gin_binding', action='append', default=[],
                      help='a binding NAME=VALUE fixed for every run (as --gin.NAME=VALUE)')
  parser.add_argument('--grid', action='append', default=[],
                      help='NAME=[V1, V2, ...]: a gin macro or configurable parameter and its '
                      'values (repeatable: the cartesian product is swept)')
  parser.add_argument('--sweep_dir', help='root folder: one subfolder per run, sweep.json, '
                      'summary.md, summary.json')
  parser.add_argument('--command', default='train', choices=('train', 'eval'),
                      help='subcommand each run launches (default: train)')
  parser.add_argument('--launch_prefix', default='',
                      help='text printed before each launch command (a cluster submit wrapper)')
  parser.add_argument('--dry_run', action='store_true',
                      help='only print the launch commands (and write sweep.json)')
  parser.add_argument('--summarize_only', action='store_true',
                      help='only tabulate the runs of an existing --sweep_dir')
  parser.add_argument('--quiet', action='store_true',
                      help='do not echo the runs\' output (it still goes to RUN/sweep_run.log)')
  parser.add_argument('--gin_search_paths', action='append', default=[])
  parser.add_argument('--module_import', action='append', default=[])
  parser.add_argument('--log_level', default=None, help='passed on to each run')
  ns = parser.parse_args(rest)
  if not ns.sweep_dir:
    raise SweepError('--sweep_dir is required')
  if '://' in ns.sweep_dir:
    raise SweepError(f'--sweep_dir={ns.sweep_dir}: a local folder is needed (sweep.json and the '
                     'run logs are written with plain file operations)')
  ns.sweep_dir = os.path.abspath(ns.sweep_dir)
  return ns, bindings + ns.gin_binding


# ----------------------------------------------------------------------------- gin checks


def _resolve_macros(value: Any) -> Any:
  """Follows `%MACRO` references in a queried gin value down to the bound value."""
  import gin  # pylint: disable=g-import-not-at-top
  for _ in range(32):
    if not (isinstance(value, gin.config.ConfigurableReference) and
            value.scoped_selector.endswith('gin.macro')):
      break
    value = gin.query_parameter('%' + value.scoped_selector.rsplit('/', 1)[0])
  return value


def _final_step(command: str) -> Optional[int]:
  """TRAIN_STEPS of the parsed config (the step a finished run has a checkpoint at)."""
  import gin  # pylint: disable=g-import-not-at-top
  if command != 'train':
    return None
  try:
    value = _resolve_macros(gin.query_parameter('train.train_steps'))
  except ValueError:
    return None
  return value if isinstance(value, int) else None


def check_runs(ns: argparse.Namespace, fixed: Sequence[str],
               grid: Sequence[tuple[str, Sequence[str]]], runs: Sequence[Run]):
  """Parses every run's gin config before anything is launched; sets each Run.final_step.

  Raises:
    SweepError: a gin file or binding that does not parse, a grid name that is neither a macro
      the gin files set nor a configurable's parameter, or a binding of MODEL_DIR.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from musiclm_jax import main  # pylint: disable=g-import-not-at-top
  for b in fixed:
    if b.partition('=')[0].strip() == 'MODEL_DIR':
      raise SweepError(f'--gin.{b}: the sweep binds MODEL_DIR to each run\'s folder under '
                       f'--sweep_dir={ns.sweep_dir}')
    if b.partition('=')[0].strip() in dict(grid):
      raise SweepError(f'--gin.{b}: {b.partition("=")[0].strip()} is also a --grid name')
  for module in ns.module_import:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise SweepError(f'--module_import={module}: {e}') from e
  placeholder = [f'MODEL_DIR={_gin_string(os.path.join(ns.sweep_dir, "_check"))}']
  try:
    gin.clear_config(clear_constants=False)
    main.parse_gin(ns.gin_file, placeholder + list(fixed), ns.gin_search_paths)
    for name, values in grid:
      if '.' in name:  # a configurable's parameter: gin knows its configurables' signatures
        try:
          with gin.unlock_config():
            gin.parse_config(f'{name}={values[0]}')
        except Exception as e:  # pylint: disable=broad-except
          raise SweepError(f'--grid {name}=...: not a gin binding of --gin_file='
                           f'{",".join(ns.gin_file)}: {str(e).splitlines()[0]}') from e
        continue
      try:
        gin.query_parameter(f'%{name}')
      except ValueError as e:
        raise SweepError(
            f'--grid {name}=...: {name} is not a macro set in --gin_file='
            f'{",".join(ns.gin_file)} (nor a binding of a configurable\'s parameter, which '
            'would read configurable.parameter)') from e
    for run in runs:
      gin.clear_config(clear_constants=False)
      try:
        main.parse_gin(ns.gin_file, run.gin_bindings, ns.gin_search_paths)
      except main.UsageError as e:
        raise SweepError(f'run {run.name}: {e}') from e
      run.final_step = _final_step(ns.command)
  except main.UsageError as e:
    raise SweepError(str(e)) from e
  finally:
    gin.clear_config(clear_constants=False)


def _gin_string(text: str) -> str:
  """A gin string literal, double-quoted when it can be (it shell-quotes more readably)."""
  return f'"{text}"' if not set('"\\\n') & set(text) else repr(text)


def build_runs(ns: argparse.Namespace, fixed: Sequence[str],
               grid: Sequence[tuple[str, Sequence[str]]]) -> list[Run]:
  """The sweep's runs, each with its folder and its `musiclm-jax` arguments."""
  points = expand_grid(grid)
  runs = []
  for name, point in zip(run_names(points), points):
    model_dir = os.path.join(ns.sweep_dir, name)
    bindings = ([f'MODEL_DIR={_gin_string(model_dir)}'] + list(fixed) +
                [f'{k}={v}' for k, v in point.items()])
    argv = [ns.command] + [f'--gin_file={f}' for f in ns.gin_file]
    argv += [f'--gin_search_paths={p}' for p in ns.gin_search_paths]
    argv += [f'--module_import={m}' for m in ns.module_import]
    if ns.log_level:
      argv.append(f'--log_level={ns.log_level}')
    argv += [f'--gin.{b}' for b in bindings]
    runs.append(Run(name=name, bindings=point, model_dir=model_dir, argv=argv,
                    gin_bindings=bindings))
  return runs


# ----------------------------------------------------------------------------- sweep.json


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def read_sweep_json(sweep_dir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(sweep_dir, SWEEP_JSON)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SweepError(f'{path}: unreadable ({e}); move it away to start the sweep afresh') from e


def write_json(path: str, data: Any):
  """Writes JSON through a rename, so a crash never leaves half a file."""
  atomic.write_json(path, data, sort_keys=False)


def merge_sweep_json(previous: Optional[dict[str, Any]], ns: argparse.Namespace,
                     fixed: Sequence[str], grid: Sequence[tuple[str, Sequence[str]]],
                     runs: Sequence[Run]) -> dict[str, Any]:
  """sweep.json for this invocation: earlier runs kept as they were, new runs added as pending.

  Raises:
    SweepError: a run folder recorded with a different launch command (other gin files or
      bindings): continuing would mix two configurations in one folder.
  """
  record = previous or {'runs': []}
  by_name = {r['name']: r for r in record['runs']}
  old_grid = dict(record.get('grid', {}))
  for name, values in grid:
    old_grid[name] = list(dict.fromkeys(list(old_grid.get(name, [])) + list(values)))
  record.update(command=ns.command, gin_files=list(ns.gin_file), fixed_bindings=list(fixed),
                grid=old_grid, launch_prefix=ns.launch_prefix)
  for run in runs:
    entry = by_name.get(run.name)
    if entry is None:
      entry = {'name': run.name, 'bindings': run.bindings, 'model_dir': run.model_dir,
               'argv': run.argv, 'command': run.command(ns.launch_prefix),
               'final_step': run.final_step, 'status': 'pending', 'attempts': 0}
      record['runs'].append(entry)
      by_name[run.name] = entry
    elif entry.get('argv') != run.argv:
      raise SweepError(
          f'{os.path.join(ns.sweep_dir, SWEEP_JSON)}: run {run.name} was launched as\n  '
          f'{shlex.join(["musiclm-jax"] + entry.get("argv", []))}\nand would now be\n  '
          f'{shlex.join(["musiclm-jax"] + run.argv)}\nUse another --sweep_dir for other gin '
          'files or fixed bindings.')
  return record


def finished_reason(run: Run, entry: dict[str, Any]) -> Optional[str]:
  """Why a run needs no launch (None: it does)."""
  if entry.get('status') == DONE:
    return 'done in sweep.json'
  if run.argv[0] == 'eval':
    path = os.path.join(run.model_dir, 'eval_results.json')
    return 'eval_results.json present' if os.path.exists(path) else None
  if run.final_step is not None and os.path.isdir(
      os.path.join(run.model_dir, 'checkpoints', str(run.final_step))):
    return f'checkpoint at step {run.final_step} (TRAIN_STEPS) present'
  return None


# ----------------------------------------------------------------------------- launching


def launch(run: Run, quiet: bool = False) -> int:
  """Runs one run as a subprocess (fresh JAX and gin), teeing its output to RUN/sweep_run.log."""
  os.makedirs(run.model_dir, exist_ok=True)
  cmd = [sys.executable, '-m', 'musiclm_jax.main'] + run.argv
  with open(os.path.join(run.model_dir, RUN_LOG), 'ab') as log:
    log.write(f'\n# {_now()} {run.command()}\n'.encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
      while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
          break
        log.write(chunk)
        if not quiet:
          sys.stdout.write(chunk.decode('utf-8', errors='replace'))
          sys.stdout.flush()
    except KeyboardInterrupt:
      # The run got the same Ctrl-C: it saves a checkpoint and exits; wait for that.
      proc.wait()
      raise
    finally:
      proc.stdout.close()
    return proc.wait()


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 16384))
      text = f.read().decode('utf-8', errors='replace')
  except OSError:
    return ''
  return '\n'.join(l.rsplit('\r', 1)[-1] for l in text.splitlines()[-lines:])


def _say(message: str):
  print(f'sweep: {message}', file=sys.stderr, flush=True)


def run_sweep(ns: argparse.Namespace, record: dict[str, Any], runs: Sequence[Run]) -> int:
  """Launches the runs that are not finished, one after another; updates sweep.json each time.

  Returns:
    0 when every run finished, 1 when one failed, 130 when interrupted by Ctrl-C.
  """
  path = os.path.join(ns.sweep_dir, SWEEP_JSON)
  entries = {e['name']: e for e in record['runs']}
  skipped = failed = 0
  for i, run in enumerate(runs, 1):
    entry = entries[run.name]
    tag = f'[{i}/{len(runs)}] {run.name}'
    reason = finished_reason(run, entry)
    if reason:
      skipped += 1
      if entry.get('status') != DONE:
        entry.update(status=DONE, finished=entry.get('finished') or _now())
        write_json(path, record)
      _say(f'{tag}: skipped, already finished ({reason})')
      continue
    resuming = os.path.isdir(os.path.join(run.model_dir, 'checkpoints'))
    _say(f'{tag}: {"resuming" if resuming else "launching"} '
         f'(log: {os.path.join(run.model_dir, RUN_LOG)})')
    entry.update(status='running', started=_now(), attempts=entry.get('attempts', 0) + 1)
    write_json(path, record)
    start = time.perf_counter()
    try:
      rc = launch(run, ns.quiet)
    except KeyboardInterrupt:
      entry.update(status='interrupted', finished=_now(),
                   wall_seconds=entry.get('wall_seconds', 0.0) + time.perf_counter() - start)
      write_json(path, record)
      _say(f'{tag}: interrupted; the same command resumes the sweep')
      return 130
    seconds = time.perf_counter() - start
    entry.update(status=DONE if rc == 0 else 'failed', exit_status=rc, finished=_now(),
                 wall_seconds=round(entry.get('wall_seconds', 0.0) + seconds, 2))
    write_json(path, record)
    if rc == 0:
      _say(f'{tag}: done in {seconds:.1f} s')
    else:
      failed += 1
      _say(f'{tag}: FAILED with exit status {rc} after {seconds:.1f} s; last lines of its log:\n'
           + _tail(os.path.join(run.model_dir, RUN_LOG)))
  launched = len(runs) - skipped
  _say(f'{len(runs)} runs: {launched} launched ({failed} failed), {skipped} skipped as finished')
  return 1 if failed else 0


# ----------------------------------------------------------------------------- summary


def read_scalars(logdir: str) -> dict[str, tuple[int, float, float]]:
  """The final value of each scalar tag in a folder's TensorBoard events.

  Returns:
    tag -> (step, value, wall time) of its highest step (the latest write on a tie, as a resumed
    run rewrites the steps after its checkpoint).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*')))
  if not files:
    return {}
  tf = quiet_tensorflow()
  final: dict[str, tuple[int, float, float]] = {}
  for path in files:
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
          if value.HasField('simple_value'):
            number = float(value.simple_value)
          elif value.HasField('tensor'):
            array = tf.make_ndarray(value.tensor)
            if array.size != 1 or not np.issubdtype(array.dtype, np.number):
              continue  # audio, images, text
            number = float(array.reshape(()))
          else:
            continue
          key = (int(event.step), float(event.wall_time))
          if value.tag not in final or key >= final[value.tag][::2]:
            final[value.tag] = (key[0], number, key[1])
    except tf.errors.DataLossError:
      pass  # a file cut short by a crash: keep what was read
  return final


def summarize_run(entry: dict[str, Any]) -> dict[str, Any]:
  """One run's bindings, status and final scalars (train/ and eval/ events, eval_results.json)."""
  model_dir = entry['model_dir']
  train = read_scalars(os.path.join(model_dir, 'train'))
  evals = read_scalars(os.path.join(model_dir, 'eval'))
  results_path = os.path.join(model_dir, 'eval_results.json')
  if os.path.exists(results_path):
    with open(results_path, encoding='utf-8') as f:
      results = json.load(f)
    for k, v in results.items():
      if isinstance(v, (int, float)) and k != 'step' and f'eval/{k}' not in evals:
        evals[f'eval/{k}'] = (int(results.get('step', -1)), float(v), 0.0)
  steps = [s for s, _, _ in list(train.values()) + list(evals.values())]
  times = [t for _, _, t in list(train.values()) + list(evals.values()) if t]
  wall = entry.get('wall_seconds')
  return {
      'name': entry['name'], 'bindings': entry['bindings'], 'status': entry.get('status'),
      'exit_status': entry.get('exit_status'), 'model_dir': model_dir,
      'step': max(steps) if steps else None,
      'wall_seconds': wall if wall is not None else (
          round(max(times) - min(times), 2) if len(times) > 1 else None),
      'train': {k: v for k, (_, v, _) in sorted(train.items())},
      'eval': {k: v for k, (_, v, _) in sorted(evals.items())},
  }


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value).replace('|', '\\|')


def summary_table(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
  """The Markdown table: one row per run, its grid values, status, step and final scalars."""
  train_cols = [(k, label) for k, label in _TRAIN_COLUMNS if any(k in r['train'] for r in rows)]
  eval_cols = sorted({k for r in rows for k in r['eval']})
  header = (list(names) + ['status', 'step'] + [label for _, label in train_cols] + eval_cols +
            ['wall time (s)'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    status = r['status'] or ''
    if r.get('exit_status'):
      status += f' ({r["exit_status"]})'
    cells = ([_value_label(r['bindings'].get(n, '')) for n in names] + [status, r['step']] +
             [r['train'].get(k) for k, _ in train_cols] + [r['eval'].get(k) for k in eval_cols] +
             [r['wall_seconds']])
    lines.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def summarize(sweep_dir: str) -> str:
  """Tabulates every run in SWEEP_DIR/sweep.json; writes summary.md and summary.json."""
  record = read_sweep_json(sweep_dir)
  if record is None:
    raise SweepError(f'--sweep_dir={sweep_dir}: no {SWEEP_JSON} (not a sweep folder)')
  rows = [summarize_run(entry) for entry in record['runs']]
  table = summary_table(rows, list(record.get('grid', {})))
  with open(os.path.join(sweep_dir, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(table)
  write_json(os.path.join(sweep_dir, 'summary.json'), {'grid': record.get('grid', {}),
                                                       'runs': rows})
  return table


# ----------------------------------------------------------------------------- entry point


def sweep(argv: Sequence[str]) -> int:
  """The sweep with the given flags; raises SweepError on bad input."""
  ns, fixed = parse_args(argv)
  if ns.summarize_only:
    print(summarize(ns.sweep_dir), end='')
    return 0
  if not ns.gin_file:
    raise SweepError('--gin_file is required (the runs\' gin files)')
  if not ns.grid:
    raise SweepError('--grid NAME=[V1, V2, ...] is required (nothing to sweep)')
  import musiclm_jax.gin_configurables  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  grid = [parse_grid(spec) for spec in ns.grid]
  runs = build_runs(ns, fixed, grid)
  check_runs(ns, fixed, grid, runs)
  previous = read_sweep_json(ns.sweep_dir)
  record = merge_sweep_json(previous, ns, fixed, grid, runs)
  write_json(os.path.join(ns.sweep_dir, SWEEP_JSON), record)
  for run in runs:
    print(run.command(ns.launch_prefix), flush=True)
  if ns.dry_run:
    _say(f'{len(runs)} launch commands; runs recorded in '
         f'{os.path.join(ns.sweep_dir, SWEEP_JSON)} (--dry_run: nothing launched)')
    return 0
  rc = run_sweep(ns, record, runs)
  if rc != 130:
    table = summarize(ns.sweep_dir)
    print('\n' + table, end='')
    _say(f'summary: {os.path.join(ns.sweep_dir, "summary.md")}')
  return rc


def main(argv: Sequence[str]) -> int:
  """`musiclm-jax sweep ...`: exit status 0, 1 (a run failed), 2 (bad flags) or 130 (Ctrl-C)."""
  try:
    return sweep(argv)
  except SweepError as e:
    print(f'musiclm-jax sweep: error: {e}', file=sys.stderr)
    return 2
