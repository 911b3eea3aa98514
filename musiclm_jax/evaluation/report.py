"""An evaluation report: metrics.json, report.md with tables and plots, TensorBoard scalars.

  path = write_report('runs/eval/report', metrics, title='Text adherence', step=20000,
                      confusions={'tempo': (matrix, ['slow', 'medium', 'fast'])},
                      history={'adherence/accuracy/tempo': [(10000, 0.41), (20000, 0.55)]},
                      training_curves={'semantic_stage': read_scalar_curves(
                                           'runs/semantic_stage/eval'),
                                       'fine_stage': 'its source run is missing'})

writes into out_dir:
  metrics.json       `metrics` exactly as given (numpy scalars and arrays made plain JSON; NaN
                     and inf are written as Python's json writes them: NaN, Infinity);
  history.json       `history` as {name: [[step, value], ...]} (when given), so that the next
                     call can extend it;
  training_curves.json  `training_curves` as {run: {tag: [[step, value], ...]} or the reason
                     it has none} (when given);
  report.md          the title, step and notes, Markdown tables of the metrics, the history,
                     the training curves (a table per run, or why it is skipped), and links to
                     the plots;
  plots/*.png        one confusion matrix per attribute (rows: true class, normalised per row,
                     counts written in the cells when there are few classes), one line plot
                     per group of history metrics (names sharing all but their last '/' part
                     share a plot), and one plot per run of training curves (a panel per kind
                     of metric: 'eval/loss' and 'eval/loss_unconditional' share the loss panel);
  tensorboard/       event files: every numeric leaf of `metrics` as a scalar named by its path
                     ('real_audio/tempo/accuracy') at `step` (0 when None), and the confusion
                     plots as images (musiclm_jax/train/summaries.SummaryWriter). Calls with the
                     same out_dir at successive steps add up to curves over checkpoints.

Files are written atomically (a temporary file renamed into place). Tables: a mapping whose
values are all leaves becomes a two-column table; a mapping of such mappings becomes one table,
a row per entry and a column per key; lists (e.g. confusion matrices) are left to metrics.json.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from musiclm_jax.common import atomic

METRICS_NAME = 'metrics.json'
HISTORY_NAME = 'history.json'
CURVES_NAME = 'training_curves.json'
REPORT_NAME = 'report.md'
PLOTS_DIR = 'plots'
TENSORBOARD_DIR = 'tensorboard'
# Confusion matrices with at most this many classes get their counts written in the cells.
ANNOTATE_MAX_CLASSES = 16

Confusion = tuple[Any, Sequence[str]]
History = Mapping[str, Sequence[tuple[float, float]]]
# {run: {tag: [(step, value), ...]} or a string: why the run has no curves}.
TrainingCurves = Mapping[str, Union[History, str]]


def to_json(value: Any, where: str = 'metrics') -> Any:
  """`value` as plain JSON types: numpy scalars and arrays become numbers and lists."""
  if isinstance(value, Mapping):
    out = {}
    for key, item in value.items():
      if not isinstance(key, str):
        raise TypeError(f'{where}: key {key!r} is a {type(key).__name__}; JSON keys are strings')
      out[key] = to_json(item, f'{where}/{key}')
    return out
  if isinstance(value, (list, tuple)):
    return [to_json(v, f'{where}[{i}]') for i, v in enumerate(value)]
  if isinstance(value, np.ndarray):
    return to_json(value.tolist(), where)
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  if value is None or isinstance(value, str):
    return value
  raise TypeError(f'{where}: {type(value).__name__} is not JSON-able')


def _write_atomically(path: str, write) -> str:
  return atomic.write_atomically(path, write, suffix=os.path.splitext(path)[1])


def write_json_atomically(path: str, value: Any) -> str:
  """Writes `value` (to_json) as indented JSON at `path` via a temporary file; returns path."""
  return atomic.write_text(path, json.dumps(to_json(value), indent=1) + '\n')


# Markdown.


def _is_leaf(value: Any) -> bool:
  return not isinstance(value, (Mapping, list, tuple, np.ndarray))


def format_value(value: Any) -> str:
  """A table cell: floats to 4 significant digits, ints whole, text with '|' escaped."""
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if math.isnan(value) or math.isinf(value):
      return str(value)
    return f'{value:.4g}'
  return str(value).replace('|', '\\|').replace('\n', ' ')


def _is_record(value: Any) -> bool:
  """A non-empty mapping whose values are leaves or lists (a table row)."""
  return isinstance(value, Mapping) and bool(value) and all(
      not isinstance(v, Mapping) for v in value.values())


def _leaf_table(items: Mapping[str, Any]) -> list[str]:
  lines = ['| metric | value |', '|---|---:|']
  lines += [f'| {format_value(k)} | {format_value(v)} |' for k, v in items.items()]
  return lines


def _record_table(records: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
  """A table with a row per record and a column per leaf key; also the list keys left out."""
  columns, omitted = [], []
  for record in records.values():
    for key, value in record.items():
      target = columns if _is_leaf(value) else omitted
      if key not in target:
        target.append(key)
  omitted = [k for k in omitted if k not in columns]
  lines = ['| | ' + ' | '.join(format_value(c) for c in columns) + ' |',
           '|---|' + '---:|' * len(columns)]
  for name, record in records.items():
    cells = [format_value(record[c]) if c in record and _is_leaf(record[c]) else ''
             for c in columns]
    lines.append(f'| {format_value(name)} | ' + ' | '.join(cells) + ' |')
  return lines, omitted


def metrics_markdown(metrics: Mapping[str, Any], heading_level: int = 2,
                     path: str = '') -> list[str]:
  """Markdown tables of nested metrics (see the module docstring)."""
  lines: list[str] = []
  leaves = {k: v for k, v in metrics.items() if _is_leaf(v)}
  records = {k: v for k, v in metrics.items() if _is_record(v)}
  nested = {k: v for k, v in metrics.items()
            if isinstance(v, Mapping) and k not in records and v}
  lists = [k for k, v in metrics.items() if isinstance(v, (list, tuple, np.ndarray))]
  if leaves:
    lines += _leaf_table(leaves) + ['']
  if records:
    table, omitted = _record_table(records)
    lines += table
    if omitted:
      lines.append(f'\n({", ".join(omitted)}: in {METRICS_NAME})')
    lines.append('')
  if lists:
    lines += [f'({", ".join(lists)}: in {METRICS_NAME})', '']
  for key, value in nested.items():
    name = f'{path}/{key}' if path else key
    lines += [f'{"#" * min(heading_level, 6)} {name}', '']
    lines += metrics_markdown(value, heading_level + 1, name)
  return lines


# Plots.


def _safe_name(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')[:80] or 'plot'


def _figure(width: float, height: float):
  """A matplotlib Figure on an Agg canvas (no pyplot: no global backend, no GUI)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(width, height))
  FigureCanvasAgg(figure)
  return figure


def _save_png(figure, path: str) -> np.ndarray:
  """Saves the figure atomically; returns its RGB pixels (for TensorBoard)."""
  figure.canvas.draw()
  pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  _write_atomically(path, lambda tmp: figure.savefig(tmp, format='png', dpi=100))
  return pixels


def check_confusion(name: str, matrix: Any, class_names: Sequence[str]) -> np.ndarray:
  """A confusion matrix as a [C, C] float array, checked against its class names."""
  array = np.asarray(matrix, np.float64)
  names = list(class_names)
  if array.ndim != 2 or array.shape[0] != array.shape[1]:
    raise ValueError(f'confusions[{name!r}]: expected a square [C, C] matrix, got shape '
                     f'{array.shape}')
  if array.shape[0] != len(names):
    raise ValueError(f'confusions[{name!r}]: {array.shape[0]} classes in the matrix, '
                     f'{len(names)} class names')
  if not np.isfinite(array).all() or (array < 0).any():
    raise ValueError(f'confusions[{name!r}]: counts must be finite and non-negative')
  return array


def plot_confusion(path: str, name: str, matrix: np.ndarray,
                   class_names: Sequence[str]) -> np.ndarray:
  """One confusion matrix as a PNG: colour = share of the true class's clips; returns pixels."""
  num = matrix.shape[0]
  totals = matrix.sum(axis=1, keepdims=True)
  shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
  size = min(4.0 + 0.28 * num, 16.0)
  figure = _figure(size + 1.0, size)
  axis = figure.add_subplot(1, 1, 1)
  image = axis.imshow(shares, cmap='Blues', vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label='share of the true class')
  ticks = np.arange(num)
  font = 8 if num <= 24 else 6
  axis.set_xticks(ticks, [str(c) for c in class_names], rotation=90, fontsize=font)
  axis.set_yticks(ticks, [f'{c} ({int(t)})' for c, t in zip(class_names, totals[:, 0])],
                  fontsize=font)
  axis.set_xlabel('predicted')
  axis.set_ylabel('true (clips)')
  total = matrix.sum()
  accuracy = np.trace(matrix) / total if total else float('nan')
  axis.set_title(f'{name}: accuracy {accuracy:.3f} over {int(total)} clips', fontsize=10)
  if num <= ANNOTATE_MAX_CLASSES:
    for i in range(num):
      for j in range(num):
        if matrix[i, j]:
          axis.text(j, i, format_value(matrix[i, j]), ha='center', va='center', fontsize=font,
                    color='white' if shares[i, j] > 0.6 else 'black')
  figure.tight_layout()
  return _save_png(figure, path)


def check_history(history: History) -> dict[str, list[tuple[float, float]]]:
  """{name: [(step, value), ...]} sorted by step, checked."""
  out = {}
  for name, points in history.items():
    rows = []
    for i, point in enumerate(points):
      try:
        step, value = point
        rows.append((float(step), float(value)))
      except (TypeError, ValueError):
        raise ValueError(f'history[{name!r}][{i}] = {point!r}: expected (step, value) '
                         'numbers') from None
    out[name] = sorted(rows, key=lambda r: r[0])
  return out


def history_groups(names: Sequence[str]) -> dict[str, list[str]]:
  """History names grouped into plots: all but the last '/' part is the plot's name."""
  groups: dict[str, list[str]] = {}
  for name in names:
    group = name.rsplit('/', 1)[0] if '/' in name else name
    groups.setdefault(group, []).append(name)
  return groups


def plot_history(path: str, group: str, series: Mapping[str, Sequence[tuple[float, float]]]
                 ) -> np.ndarray:
  """Metrics over steps (checkpoints), one line each; returns pixels."""
  figure = _figure(7.0, 4.0)
  axis = figure.add_subplot(1, 1, 1)
  for name, points in series.items():
    if not points:
      continue
    steps, values = zip(*points)
    label = name[len(group) + 1:] if name.startswith(group + '/') else name
    axis.plot(steps, values, marker='o', markersize=3, label=label)
  axis.set_xlabel('step')
  axis.set_title(group, fontsize=10)
  axis.grid(alpha=0.3)
  if len(series) > 1:
    axis.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
  figure.tight_layout()
  return _save_png(figure, path)


def _steps_table(series: Mapping[str, Sequence[tuple[float, float]]], prefix: str = ''
                 ) -> list[str]:
  """A Markdown table with a row per step and a column per series (names less `prefix`)."""
  names = list(series)
  steps = sorted({s for n in names for s, _ in series[n]})
  short = [n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names]
  lines = ['| step | ' + ' | '.join(format_value(s) for s in short) + ' |',
           '|---:|' + '---:|' * len(names)]
  for s in steps:
    values = [dict(series[n]).get(s) for n in names]
    lines.append(f'| {format_value(int(s) if float(s).is_integer() else s)} | ' + ' | '.join(
        '' if v is None else format_value(v) for v in values) + ' |')
  return lines


def _curve_label(name: str) -> str:
  return name[len('eval/'):] if name.startswith('eval/') else name


def curve_panels(names: Sequence[str]) -> dict[str, list[str]]:
  """Training-curve tags grouped into panels by kind: the name less 'eval/', up to '/' or '_'.

  'eval/loss', 'eval/loss_unconditional' and 'eval/loss/level_1' share the 'loss' panel;
  'eval/accuracy' is in 'accuracy'.
  """
  panels: dict[str, list[str]] = {}
  for name in names:
    kind = re.split(r'[/_]', _curve_label(name), maxsplit=1)[0] or name
    panels.setdefault(kind, []).append(name)
  return panels


def plot_training_curves(path: str, run: str,
                         series: Mapping[str, Sequence[tuple[float, float]]]) -> np.ndarray:
  """A run's scalars over training steps, a panel per kind (`curve_panels`); returns pixels."""
  panels = curve_panels(list(series))
  figure = _figure(4.0 * len(panels) + 1.0, 3.6)
  for i, (kind, names) in enumerate(panels.items()):
    axis = figure.add_subplot(1, len(panels), i + 1)
    for name in names:
      if not series[name]:
        continue
      steps, values = zip(*series[name])
      axis.plot(steps, values, marker='o', markersize=3,
                linestyle='--' if name.endswith('_unconditional') else '-',
                label=_curve_label(name))
    axis.set_xlabel('training step')
    axis.set_title(kind, fontsize=10)
    axis.grid(alpha=0.3)
    if len(names) > 1:
      axis.legend(fontsize=7)
  figure.suptitle(f'{run}: eval metrics over checkpoints', fontsize=10)
  figure.tight_layout()
  return _save_png(figure, path)


def read_scalar_curves(logdir: str, tags: Optional[Sequence[str]] = None
                       ) -> dict[str, list[tuple[float, float]]]:
  """{tag: [(step, value), ...] by step} of the scalars in the event files of `logdir`.

  Reads TF2 scalar summaries (0-d tensors, as `summaries.SummaryWriter` writes) and TF1
  simple values. A step written twice (a checkpoint evaluated again, or reached again after a
  restart) keeps the value read last (files in name order, i.e. by creation time); nothing is
  purged for being out of order, so evaluating an older checkpoint later does not cut the
  curve.

  Args:
    logdir: a folder of event files (a training run's eval/ folder).
    tags: the tags to keep, in this order (None: every scalar tag, sorted).

  Returns:
    The curves found (a tag without events is left out; {} when the folder has none).
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0,
                             event_accumulator.IMAGES: 1, event_accumulator.AUDIO: 1},
      purge_orphaned_data=False)
  accumulator.Reload()
  found = accumulator.Tags()
  curves: dict[str, dict[float, float]] = {}
  for tag in found.get(event_accumulator.TENSORS, []):
    for event in accumulator.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        curves.setdefault(tag, {})[float(event.step)] = float(value)
  for tag in found.get(event_accumulator.SCALARS, []):
    for event in accumulator.Scalars(tag):
      curves.setdefault(tag, {})[float(event.step)] = float(event.value)
  order = sorted(curves) if tags is None else [t for t in tags if t in curves]
  return {t: sorted(curves[t].items()) for t in order}


def check_training_curves(curves: TrainingCurves) -> dict[str, Union[dict, str]]:
  """{run: checked {tag: [(step, value)]} or its reason}; an empty run is a ValueError."""
  out: dict[str, Union[dict, str]] = {}
  for run, value in curves.items():
    if isinstance(value, str):
      out[run] = value
    elif isinstance(value, Mapping) and value:
      out[run] = check_history({f'{run}/{k}': v for k, v in value.items()})
      out[run] = {k[len(run) + 1:]: v for k, v in out[run].items()}
    else:
      raise ValueError(f'training_curves[{run!r}]: expected {{tag: [(step, value), ...]}} or '
                       f'a string saying why there are none, got {value!r}')
  return out


# TensorBoard.


def numeric_leaves(metrics: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  """{'a/b/c': value} for every int or float leaf (not bools, lists or text)."""
  out = {}
  for key, value in metrics.items():
    name = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(numeric_leaves(value, name))
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)):
      out[name] = float(value)
  return out


def write_report(out_dir: str, metrics: Mapping[str, Any], *, title: str,
                 step: Optional[int] = None,
                 confusions: Optional[Mapping[str, Confusion]] = None,
                 history: Optional[History] = None, notes: Optional[Sequence[str]] = None,
                 training_curves: Optional[TrainingCurves] = None,
                 tensorboard: bool = True) -> str:
  """Writes an evaluation report into out_dir (see the module docstring).

  Args:
    out_dir: the report's folder (created; files of the same names are replaced).
    metrics: nested JSON-able metrics (str keys; numbers, text, lists, numpy values).
    title: the report's heading.
    step: the checkpoint step evaluated (TensorBoard step; 0 when None).
    confusions: {attribute: (C x C counts, rows true / columns predicted, C class names)}.
    history: {metric name: [(step, value), ...]} over checkpoints, for line plots.
    notes: lines written under the title (what was evaluated, caveats).
    training_curves: {run (e.g. a pipeline part): {tag: [(step, value), ...]} (e.g.
      `read_scalar_curves` of the run's eval/ folder), or a string saying why it has none}:
      a plot and a table per run, or the reason.
    tensorboard: also write TensorBoard scalars and images.

  Returns:
    The path of report.md.
  """
  if not isinstance(metrics, Mapping):
    raise TypeError(f'metrics: expected a mapping, got {type(metrics).__name__}')
  if not title or not isinstance(title, str):
    raise ValueError('title: a non-empty string is needed')
  plain = to_json(metrics)
  checked_confusions = {name: (check_confusion(name, matrix, names), list(names))
                        for name, (matrix, names) in (confusions or {}).items()}
  checked_history = check_history(history or {})
  checked_curves = check_training_curves(training_curves or {})
  os.makedirs(out_dir, exist_ok=True)
  write_json_atomically(os.path.join(out_dir, METRICS_NAME), plain)
  if history is not None:
    write_json_atomically(os.path.join(out_dir, HISTORY_NAME),
                          {k: [list(p) for p in v] for k, v in checked_history.items()})
  if training_curves is not None:
    write_json_atomically(os.path.join(out_dir, CURVES_NAME), {
        run: v if isinstance(v, str) else {k: [list(p) for p in points]
                                           for k, points in v.items()}
        for run, v in checked_curves.items()})

  lines = [f'# {title}', '']
  if step is not None:
    lines += [f'Step {int(step)}.', '']
  for note in notes or ():
    lines.append(f'- {note}')
  if notes:
    lines.append('')
  lines += ['## Metrics', '']
  lines += metrics_markdown(plain, heading_level=3) or ['(none)', '']

  images: dict[str, np.ndarray] = {}
  if checked_confusions:
    lines += ['## Confusion matrices', '',
              'Rows: true class (clip count in brackets); columns: predicted; colour: share of '
              'the row.', '']
    for name, (matrix, names) in checked_confusions.items():
      relative = f'{PLOTS_DIR}/confusion_{_safe_name(name)}.png'
      images[f'confusion/{name}'] = plot_confusion(os.path.join(out_dir, relative), name,
                                                   matrix, names)
      lines += [f'### {name}', '', f'![{name} confusion matrix]({relative})', '']
  if checked_history:
    lines += ['## Over checkpoints', '']
    for group, names in history_groups(list(checked_history)).items():
      relative = f'{PLOTS_DIR}/history_{_safe_name(group)}.png'
      plot_history(os.path.join(out_dir, relative), group,
                   {n: checked_history[n] for n in names})
      lines += [f'### {group}', '', f'![{group}]({relative})', '']
      lines += _steps_table({n: checked_history[n] for n in names}, prefix=group + '/')
      lines.append('')
  if checked_curves:
    lines += ['## Training curves', '',
              'Eval metrics of each run at its evaluated checkpoints (the scalars its training '
              f'wrote to TensorBoard; also in {CURVES_NAME}).', '']
    for run, curves in checked_curves.items():
      lines += [f'### {run}', '']
      if isinstance(curves, str):
        lines += [f'Skipped: {curves}.', '']
        continue
      relative = f'{PLOTS_DIR}/training_{_safe_name(run)}.png'
      images[f'training_curves/{run}'] = plot_training_curves(os.path.join(out_dir, relative),
                                                              run, curves)
      lines += [f'![{run} training curves]({relative})', '']
      lines += _steps_table(curves, prefix='eval/') + ['']

  if tensorboard:
    from musiclm_jax.train import summaries  # pylint: disable=g-import-not-at-top
    writer = summaries.SummaryWriter(os.path.join(out_dir, TENSORBOARD_DIR))
    try:
      tb_step = 0 if step is None else int(step)
      writer.scalars(tb_step, numeric_leaves(plain))
      for name, pixels in images.items():
        writer.image(tb_step, name, pixels[None])
      writer.flush()
    finally:
      writer.close()
    lines += [f'TensorBoard: `tensorboard --logdir {os.path.join(out_dir, TENSORBOARD_DIR)}`', '']

  text = '\n'.join(lines).rstrip('\n') + '\n'
  return atomic.write_text(os.path.join(out_dir, REPORT_NAME), text)
