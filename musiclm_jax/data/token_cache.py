"""Token caching: SeqIO tasks preprocessed up to their cache placeholder by an Apache Beam pipeline.

A task whose preprocessors hold `tokenize_audio` (a frozen model) followed by a
`seqio.CacheDatasetPlaceholder()` is run through its pre-cache preprocessors once, by
`cache_tasks` (`musiclm-jax tokenize`), and written as SeqIO's own cache: sharded TFRecords of
tf.Examples, `info.<split>.json`, `stats.<split>.json` and `COMPLETED` under
`<cache_dir>/<task>/`. Training then reads it with `DatasetConfig(use_cached=True,
cache_dir=...)`, which runs only the post-cache preprocessors.

Next to SeqIO's files, `provenance.json` records what made the tokens: each frozen tokenizer's
module, config, weights and parameter fingerprint, and the pre-cache preprocessors.
`check_cache_provenance` compares it with the task as registered now and raises
`StaleCacheError` when they differ (e.g. the tokenizer was retrained), so a cache made by another
model is never read silently.

A cache is written into a temporary sibling directory and moved into place only when the whole
pipeline has succeeded: a failed or interrupted run leaves an existing cache as it was. The move
is musiclm_jax.data.model_dir's journaled replace (fsynced on a local disk): a run killed between
taking the old cache away and putting the new one in place is rolled back or finished by the next
`check_cache_provenance` or `cache_tasks` on that cache.

The pipeline is seqio's `cache_tasks_main` built from `seqio.beam_utils`; Beam's
`pipeline_options` pick the runner: the DirectRunner in this process by default, Dataflow, Flink
or Spark for large datasets (see `cache_tasks`).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import importlib
import json
import logging
import os
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

import gin

from musiclm_jax.common.tf_setup import quiet_tensorflow
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer, jsonable
from musiclm_jax.data.model_dir import (GFiles, InterruptedReplaceError, LocalFiles, is_local,
                                        move_into_place, recover_replace)

logger = logging.getLogger(__name__)

PROVENANCE_FILE = 'provenance.json'
COMPLETED_FILE = 'COMPLETED'
CACHE_FORMAT = 1
# Provenance entries that say where the weights were found, not what they are: a cache stays
# valid when only these differ (the parameter fingerprint decides), but they are reported
# alongside a real difference because they usually explain it.
INFORMATIVE_KEYS = ('weights.path', 'weights.step')
_INT64_MAX = 2**63 - 1


class CacheError(RuntimeError):
  """A token cache that cannot be used or written as asked."""


class MissingCacheError(CacheError, FileNotFoundError):
  """No completed cache for a task (or for a split of it)."""


class StaleCacheError(CacheError):
  """A completed cache that the task as registered now would not reproduce."""


class CacheExistsError(CacheError, FileExistsError):
  """A completed cache is in the way and `overwrite` was not given."""


def _tf():
  return quiet_tensorflow()


def _seqio():
  _tf()
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio


# ------------------------------------------------------------------------------------------------
# What a task's cache is made of.


def _placeholder_index(task) -> Optional[int]:
  seqio = _seqio()
  for i, p in enumerate(task.preprocessors):
    if isinstance(p, seqio.CacheDatasetPlaceholder):
      return i
  return None


def precache_preprocessors(task) -> list[Any]:
  """The preprocessors a cache bakes in: those before the task's CacheDatasetPlaceholder."""
  index = _placeholder_index(task)
  if index is None:
    raise CacheError(f"Task '{task.name}' has no seqio.CacheDatasetPlaceholder() among its "
                     'preprocessors, so it cannot be cached')
  return list(task.preprocessors[:index])


def find_tokenizers(obj: Any, _depth: int = 0, _seen: Optional[set[int]] = None
                    ) -> list[FrozenTokenizer]:
  """FrozenTokenizers reachable from a preprocessor: partial arguments, closures, containers.

  An object with a `frozen_tokenizers()` method (a holder that builds its tokenizers on first
  use, e.g. musiclm_jax.stages.tokens.StageTokenizers) stands for the tokenizers it returns.
  """
  seen = set() if _seen is None else _seen
  if id(obj) in seen or _depth > 8:
    return []
  seen.add(id(obj))
  if isinstance(obj, FrozenTokenizer):
    return [obj]
  if _is_tokenizer_holder(obj):
    return list(obj.frozen_tokenizers())
  children: list[Any] = []
  if isinstance(obj, functools.partial):
    children = [obj.func, *obj.args, *obj.keywords.values()]
  elif isinstance(obj, (list, tuple, set, frozenset)):
    children = list(obj)
  elif isinstance(obj, dict):
    children = list(obj.values())
  elif callable(obj):
    children = [c.cell_contents for c in (getattr(obj, '__closure__', None) or ())
                if _cell_filled(c)]
    if hasattr(obj, '__wrapped__'):
      children.append(obj.__wrapped__)
  found = []
  for child in children:
    for t in find_tokenizers(child, _depth + 1, seen):
      if all(t is not f for f in found):
        found.append(t)
  return found


def _cell_filled(cell) -> bool:
  try:
    cell.cell_contents  # pylint: disable=pointless-statement
    return True
  except ValueError:  # an empty cell
    return False


def _is_tokenizer_holder(obj: Any) -> bool:
  return not isinstance(obj, type) and callable(getattr(obj, 'frozen_tokenizers', None))


def _describe_preprocessor(p: Any) -> Any:
  """A JSON description of a preprocessor; a tokenizer stands for itself by its output feature."""
  if isinstance(p, FrozenTokenizer):
    return {'frozen_tokenizer': p.output_feature}
  if _is_tokenizer_holder(p):
    return {'frozen_tokenizers': [t.output_feature for t in p.frozen_tokenizers()]}
  if isinstance(p, functools.partial):
    return {'fn': _describe_preprocessor(p.func),
            'args': [_describe_preprocessor(a) for a in p.args],
            'kwargs': {k: _describe_preprocessor(v) for k, v in sorted(p.keywords.items())}}
  if isinstance(p, (list, tuple)):
    return [_describe_preprocessor(v) for v in p]
  if isinstance(p, dict):
    return {str(k): _describe_preprocessor(v) for k, v in sorted(p.items())}
  return jsonable(p)


def task_provenance(task) -> dict[str, Any]:
  """What a cache of `task` depends on: its frozen tokenizers and its pre-cache preprocessors.

  Loads each tokenizer's weights (to fingerprint them) if they are not loaded yet.
  """
  pre = precache_preprocessors(task)
  return {
      'tokenizers': [t.provenance() for t in find_tokenizers(pre)],
      'preprocessors': [_describe_preprocessor(p) for p in pre],
  }


def task_cache_dir(task_name: str, cache_dir: str) -> str:
  """Where SeqIO keeps `task_name`'s cache under `cache_dir`."""
  return os.path.join(cache_dir, _seqio().get_task_dir_from_name(task_name))


# ------------------------------------------------------------------------------------------------
# Checking a cache.


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
    return out or {prefix: {}}
  if isinstance(tree, list):
    out = {f'{prefix}.length': len(tree)}
    for i, v in enumerate(tree):
      out.update(_flatten(v, f'{prefix}[{i}]'))
    return out
  return {prefix: tree}


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 80 else text[:77] + '...'


def provenance_differences(recorded: dict[str, Any], current: dict[str, Any]
                           ) -> tuple[list[str], list[str]]:
  """(differences that change the tokens, informative differences) between two provenances.

  Each is a line 'key: <in the cache> (cache) != <now> (task now)'.
  """
  a = _flatten({k: recorded.get(k) for k in ('tokenizers', 'preprocessors')})
  b = _flatten({k: current.get(k) for k in ('tokenizers', 'preprocessors')})
  real, informative = [], []
  for key in sorted(set(a) | set(b)):
    if a.get(key, '<absent>') == b.get(key, '<absent>'):
      continue
    was, now = _short(a.get(key, '<absent>')), _short(b.get(key, '<absent>'))
    line = f'{key}: {was} (cache) != {now} (task now)'
    is_informative = any(key.endswith('.' + k) for k in INFORMATIVE_KEYS)
    (informative if is_informative else real).append(line)
  return real, informative


def read_provenance(task_dir: str) -> dict[str, Any]:
  tf = _tf()
  with tf.io.gfile.GFile(os.path.join(task_dir, PROVENANCE_FILE)) as f:
    return json.load(f)


def check_cache_provenance(task_name: str, cache_dir: Optional[str] = None,
                           split: Optional[str] = None) -> dict[str, Any]:
  """Checks that a task's completed cache was made by the task as it is registered now.

  A replace of the cache that was interrupted (a killed `cache_tasks`) is rolled back or
  finished first (model_dir.recover_replace; what cannot be resolved safely is reported).

  Args:
    task_name: a registered SeqIO task.
    cache_dir: the cache root (the cache is `<cache_dir>/<task>/`); None checks the cache SeqIO
      would read, found in its global cache directories (`seqio.add_global_cache_dirs`).
    split: also require this split in the cache.

  Returns:
    The recorded provenance.

  Raises:
    MissingCacheError: no completed cache (or no such split in it).
    StaleCacheError: the cache has no provenance record, or its tokenizers or pre-cache
      preprocessors differ from the task's now; the message names the task, the directory and
      each difference.
  """
  seqio = _seqio()
  tf = _tf()
  task = seqio.TaskRegistry.get(task_name)
  if cache_dir is None:
    for root in seqio.utils.get_global_cache_dirs():
      _recover(task_cache_dir(task_name, root))
    task_dir = task.cache_dir
    if not task_dir:
      raise MissingCacheError(
          f"Task '{task_name}' has no completed cache in the SeqIO cache directories "
          f'{list(seqio.utils.get_global_cache_dirs())}; write one with `musiclm-jax tokenize '
          f"--gin_file=runs/tokenize.gin --gin.TASKS=\"['{task_name}']\" "
          "--gin.CACHE_DIR=...` and read it with DatasetConfig.cache_dir")
  else:
    task_dir = task_cache_dir(task_name, cache_dir)
    _recover(task_dir)
    if not tf.io.gfile.exists(os.path.join(task_dir, COMPLETED_FILE)):
      raise MissingCacheError(f"Task '{task_name}' has no completed cache in {task_dir} (no "
                              f'{COMPLETED_FILE} file)')
  if not tf.io.gfile.exists(os.path.join(task_dir, PROVENANCE_FILE)):
    raise StaleCacheError(
        f"Cache of task '{task_name}' in {task_dir} has no {PROVENANCE_FILE}: it was not written "
        'by `musiclm-jax tokenize`, so what made its tokens cannot be checked. Write it again '
        '(`musiclm-jax tokenize` with --gin.OVERWRITE=True).')
  recorded = read_provenance(task_dir)
  if split is not None and split not in recorded.get('splits', ()):
    raise MissingCacheError(f"Cache of task '{task_name}' in {task_dir} has splits "
                            f"{recorded.get('splits')}, not '{split}'")
  real, informative = provenance_differences(recorded, task_provenance(task))
  if real:
    raise StaleCacheError(
        f"Cache of task '{task_name}' in {task_dir} (written {recorded.get('created', '?')}) "
        'does not match the task as registered now; write it again (`musiclm-jax tokenize` '
        'with --gin.OVERWRITE=True) or restore the old tokenizer. Differences:\n  '
        + '\n  '.join(real + informative))
  if informative:
    logger.info("Cache of task '%s' in %s: the same weights, found elsewhere: %s", task_name,
                task_dir, '; '.join(informative))
  return recorded


def check_dataset_cache(mixture_or_task_name: str, split: Optional[str] = None,
                        expected_root: Optional[str] = None):
  """`check_cache_provenance` of the cache SeqIO will read for a task or each task of a mixture.

  Args:
    mixture_or_task_name: a registered task or mixture; its tasks without a cache placeholder
      are skipped (SeqIO preprocesses those on the fly).
    split: the split that will be read.
    expected_root: the cache root the caller asked for; a task that SeqIO finds cached in
      another of its global cache directories (an earlier one wins) is reported.
  """
  seqio = _seqio()
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    if _placeholder_index(task) is None:
      continue
    check_cache_provenance(task.name, split=split)
    if expected_root and task.cache_dir != task_cache_dir(task.name, expected_root):
      logger.warning("Task '%s' will be read from the cache in %s, not from %s (SeqIO takes the "
                     'first of its global cache directories that has it)', task.name,
                     task.cache_dir, expected_root)


# ------------------------------------------------------------------------------------------------
# Reproducing what the pipeline tokenizes.


def task_preprocessors_seed(task_name: str, base_seed: Optional[int]) -> Optional[int]:
  """The per-task seed of seqio's cache_tasks_main for a `base_seed` (None without one)."""
  if not base_seed or base_seed == -1:
    return None
  return int.from_bytes(hashlib.md5(task_name.encode()).digest(), 'little') + int(base_seed)


def shard_preprocessors_seed(task_name: str, shard_index: int,
                             base_seed: Optional[int] = None) -> int:
  """The seed `seqio.beam_utils.PreprocessTask` gives the pre-cache preprocessors of a shard."""
  task_seed = task_preprocessors_seed(task_name, base_seed)
  digest = hashlib.md5((task_name + f'shard{shard_index}').encode()).digest()
  seed = int.from_bytes(digest, 'little') + (task_seed or 0)
  if seed > _INT64_MAX:
    seed = int.from_bytes(digest[:7], 'little') + (task_seed or 0)
  return seed % _INT64_MAX


def precache_examples(task_name: str, split: str, base_seed: Optional[int] = None
                      ) -> Iterator[dict[str, Any]]:
  """The examples a cache of `task_name` holds, computed here (numpy, source shard order).

  Runs the same source shards with the same seeds as the Beam pipeline, so the result equals the
  cache up to order: a way to verify a cache or debug a preprocessor without Beam.
  """
  seqio = _seqio()
  task = seqio.TaskRegistry.get(task_name)
  shards = task.source.list_shards(split)
  for index in range(len(shards)):
    seed = shard_preprocessors_seed(task_name, index, base_seed)
    ds = task.source.get_dataset(split=split, shuffle=False, seed=seed,
                                 shard_info=seqio.ShardInfo(index=index, num_shards=len(shards)))
    ds = task.preprocess_precache(ds, seed=seed)
    yield from ds.as_numpy_iterator()


# ------------------------------------------------------------------------------------------------
# Writing caches.


def _rename_tree(src: str, dst: str, marker_first: bool):
  """Moves directory `src` to `dst`: one rename where the filesystem can, else file by file.

  File by file (object stores such as GCS), the COMPLETED marker moves first when taking a cache
  away and last when putting one in place, so a half-moved directory never looks complete.
  """
  tf = _tf()
  try:
    tf.io.gfile.rename(src, dst, overwrite=False)
    return
  except (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError,
          tf.errors.PermissionDeniedError) as e:
    logger.info('Moving %s to %s file by file (%s)', src, dst, e)
  files = []
  for root, _, names in tf.io.gfile.walk(src):
    files.extend(os.path.join(root, n) for n in names)
  marker = os.path.join(src, COMPLETED_FILE)
  files.sort(key=lambda f: (f != marker) if marker_first else (f == marker))
  for f in files:
    target = os.path.join(dst, os.path.relpath(f, src))
    tf.io.gfile.makedirs(os.path.dirname(target))
    tf.io.gfile.rename(f, target, overwrite=False)
  tf.io.gfile.rmtree(src)


class _RemoteCacheFiles(GFiles):
  """GFiles moving a cache with `_rename_tree` (file by file where a folder cannot be renamed)."""

  def move(self, src: str, dst: str, into_place: bool) -> None:
    _rename_tree(src, dst, marker_first=not into_place)


def _cache_files(task_dir: str) -> LocalFiles:
  """How a cache directory is moved: os renames and fsync locally, tf.io.gfile elsewhere."""
  return LocalFiles() if is_local(task_dir) else _RemoteCacheFiles(_tf().io.gfile)


def _recover(task_dir: str, strict: bool = False):
  """Rolls back or finishes an interrupted replace of a cache (model_dir.recover_replace)."""
  try:
    return recover_replace(task_dir, _cache_files(task_dir), strict=strict)
  except InterruptedReplaceError as e:
    raise CacheError(f'Cannot write the cache in {task_dir}: {e}') from e


def _install(tmp_dir: str, final_dir: str):
  """Puts a finished cache in place, replacing (only after that succeeded) what was there.

  model_dir.move_into_place: the old cache moves to a hidden sibling under a journal, fsynced on
  a local disk, and is put back if the move fails; a kill in between is undone by the next run.
  """
  move_into_place(tmp_dir, final_dir, files=_cache_files(final_dir))


def _import_modules(modules: Iterable[str]):
  for module in modules:
    if module:
      importlib.import_module(module)


def _runner_name(pipeline_options: Sequence[str]) -> str:
  for opt in pipeline_options:
    if opt.startswith('--runner='):
      return opt.split('=', 1)[1]
  return 'DirectRunner'


def _write_example_tfrecord(output_path: str, num_shards: int):
  """seqio.beam_utils.WriteExampleTfRecord, writing records with TensorFlow's TFRecordWriter.

  Beam's own TFRecord sink needs a crc32c package (google-crc32c, crcmod or python-snappy);
  TensorFlow has one built in and writes the same format, to any filesystem it knows (gs://).
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  seqio = _seqio()
  tf = _tf()

  class TfRecordSink(beam.io.filebasedsink.FileBasedSink):
    """Shards written by tf.io.TFRecordWriter; Beam names, finalises and renames them."""

    def __init__(self):
      super().__init__(output_path, coder=beam.coders.ProtoCoder(tf.train.Example),
                       file_name_suffix='', num_shards=num_shards, shard_name_template=None,
                       mime_type='application/octet-stream',
                       compression_type=beam.io.filesystem.CompressionTypes.UNCOMPRESSED)

    def open(self, temp_path):
      return tf.io.TFRecordWriter(temp_path)

    def write_encoded_record(self, file_handle, value):
      file_handle.write(value)

    def close(self, file_handle):
      file_handle.close()

  class WriteExampleTfRecord(beam.PTransform):

    def expand(self, pcoll):
      return (pcoll | beam.Map(seqio.dict_to_tfexample) | beam.Reshuffle()
              | beam.io.iobase.Write(TfRecordSink()))

  return WriteExampleTfRecord()


@gin.configurable
def cache_tasks(task_names: Sequence[str] = gin.REQUIRED, cache_dir: str = gin.REQUIRED, *,
                splits: Optional[Sequence[str]] = None,
                pipeline_options: Sequence[str] = ('--runner=DirectRunner',),
                min_shards: int = 64, max_shards: int = 0, overwrite: bool = False,
                base_seed: Optional[int] = None, modules_to_import: Sequence[str] = (),
                tfds_data_dir: Optional[str] = None) -> list[str]:
  """Caches SeqIO tasks' pre-cache preprocessing (tokenizing) with an Apache Beam pipeline.

  One pipeline covers every task and split. Each task is written to a temporary sibling of
  `<cache_dir>/<task>/` and moved there when the pipeline has finished; `provenance.json` is added
  last. A task whose completed cache is already up to date (same provenance) is skipped; one whose
  cache differs is refused unless `overwrite`, and even then the old cache is replaced only after
  the new one is complete (a replace that an earlier run left unfinished is rolled back or
  finished first, or refused with a CacheError that gives the commands resolving it).

  Runners (Beam flags in `pipeline_options`):
    local: ['--runner=DirectRunner'] (in this process; add '--direct_num_workers=N',
      '--direct_running_mode=multi_processing' to use N processes).
    Dataflow: ['--runner=DataflowRunner', '--project=P', '--region=R',
      '--temp_location=gs://B/tmp', '--setup_file=./setup.py'] with a gs:// `cache_dir`.
    Flink / Spark: ['--runner=FlinkRunner', '--flink_master=HOST:PORT'] or
      ['--runner=SparkRunner', '--spark_master_url=spark://HOST:7077'] (portable runners).
  Remote workers register the tasks by importing `modules_to_import`: gin bindings made on the
  launching machine do not travel, so a task module must build its tokenizers itself.

  Args:
    task_names: registered SeqIO tasks, each with a CacheDatasetPlaceholder after its tokenizing.
    cache_dir: the cache root (local or gs://); read it back with DatasetConfig.cache_dir.
    splits: the splits to cache (each must exist in every task); None caches every split.
    pipeline_options: Beam's command-line options (see above).
    min_shards: at least this many output TFRecord shards per split (more shards shuffle better
      when reading); seqio's default is 64.
    max_shards: at most this many (0: no limit).
    overwrite: replace an existing completed cache that differs from the task now.
    base_seed: a base for the pre-cache preprocessors' seeds (random crops), as seqio's
      `--base_seed`; None uses seqio's per-shard seeds alone.
    modules_to_import: modules that register the tasks, imported here and by Beam workers.
    tfds_data_dir: a TFDS data directory overriding the tasks' own.

  Returns:
    The cache directories written (tasks skipped as up to date are not included).
  """
  _import_modules(modules_to_import)
  seqio = _seqio()
  tf = _tf()
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from seqio import beam_utils  # pylint: disable=g-import-not-at-top
  if isinstance(task_names, str):
    task_names = [task_names]
  if tfds_data_dir:
    seqio.set_tfds_data_dir_override(tfds_data_dir)

  # Decide everything before Beam starts: a refusal costs nothing and changes nothing.
  plans = []
  for name in task_names:
    if name not in seqio.TaskRegistry.names():
      raise CacheError(f"Task '{name}' is not registered (import its module: "
                       f'modules_to_import / --module_import / a gin `import`)')
    task = seqio.TaskRegistry.get(name)
    precache_preprocessors(task)  # raises without a placeholder
    task_splits = list(task.splits) if splits is None else list(splits)
    missing = [s for s in task_splits if s not in task.splits]
    if missing or not task_splits:
      raise CacheError(f"Task '{name}' has splits {list(task.splits)}; asked for {task_splits}")
    final_dir = task_cache_dir(name, cache_dir)
    _recover(final_dir, strict=True)
    if tf.io.gfile.exists(os.path.join(final_dir, COMPLETED_FILE)):
      try:
        recorded = check_cache_provenance(name, cache_dir)
        up_to_date = set(task_splits) <= set(recorded.get('splits', ()))
      except StaleCacheError as e:
        up_to_date, reason = False, str(e)
      else:
        reason = f'it lacks splits {sorted(set(task_splits) - set(recorded.get("splits", ())))}'
      if up_to_date and not overwrite:
        logger.warning("Task '%s' is already cached and up to date in %s: skipped", name,
                       final_dir)
        continue
      if not overwrite:
        raise CacheExistsError(
            f"Task '{name}' has a completed cache in {final_dir} that this run would change "
            f'({reason}); pass overwrite=True (--gin.OVERWRITE=True) to replace it, or choose '
            'another cache_dir')
      logger.warning("Task '%s': the completed cache in %s will be replaced once the new one is "
                     'complete', name, final_dir)
    elif tf.io.gfile.exists(final_dir):
      logger.warning("Task '%s': %s holds an incomplete cache (no %s); it will be replaced", name,
                     final_dir, COMPLETED_FILE)
    plans.append((task, task_splits, final_dir))
  if not plans:
    return []

  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S') + f'-{os.getpid()}'
  tmp_dirs = {task.name: f'{final_dir}.incomplete-{stamp}' for task, _, final_dir in plans}
  options = beam.options.pipeline_options.PipelineOptions(list(pipeline_options))
  pipeline = beam.Pipeline(options=options)
  for task, task_splits, final_dir in plans:
    out = tmp_dirs[task.name]
    tf.io.gfile.makedirs(out)
    logger.info("Caching task '%s' splits %s into %s (runner %s)", task.name, task_splits,
                   final_dir, _runner_name(pipeline_options))
    if isinstance(task.source, seqio.FunctionDataSource):
      logger.warning("Task '%s' reads a FunctionDataSource: one source shard, so one worker "
                     'tokenizes all of it', task.name)
    completion = []
    for split in task_splits:
      label = f'{task.name}_{split}'
      pat = beam_utils.PreprocessTask(
          task, split, preprocessors_seed=task_preprocessors_seed(task.name, base_seed),
          modules_to_import=tuple(modules_to_import), tfds_data_dir=tfds_data_dir)
      num_shards = max(len(pat.shards), min_shards) if min_shards > 0 else len(pat.shards)
      if max_shards > 0:
        num_shards = min(num_shards, max_shards)
      # The reshuffle shuffles examples globally, so the shards mix source shards.
      examples = (pipeline | f'{label}_pat' >> pat
                  | f'{label}_global_example_shuffle' >> beam.Reshuffle())
      completion.append(
          examples | f'{label}_write_tfrecord' >> _write_example_tfrecord(
              seqio.get_cached_tfrecord_prefix(out, split), num_shards=num_shards))
      completion.append(
          examples | f'{label}_info' >> beam_utils.GetInfo(num_shards)
          | f'{label}_write_info' >> beam_utils.WriteJson(seqio.get_cached_info_path(out, split)))
      completion.append(
          examples | f'{label}_stats' >> beam_utils.GetStats(task.output_features)
          | f'{label}_write_stats' >> beam_utils.WriteJson(
              seqio.get_cached_stats_path(out, split)))
    _ = (completion
         | f'{task.name}_flatten_completion' >> beam.Flatten()
         | f'{task.name}_discard_completion' >> beam.Filter(lambda _: False)
         | f'{task.name}_write_completed' >> beam.io.textio.WriteToText(
             os.path.join(out, COMPLETED_FILE), append_trailing_newlines=False, num_shards=1,
             shard_name_template='', header=''))

  started = time.time()
  try:
    result = pipeline.run()
    result.wait_until_finish()
    written = []
    for task, task_splits, final_dir in plans:
      out = tmp_dirs[task.name]
      if not tf.io.gfile.exists(os.path.join(out, COMPLETED_FILE)):
        raise CacheError(f"Beam finished but task '{task.name}' has no {COMPLETED_FILE} in {out}")
      record = {
          'cache_format': CACHE_FORMAT,
          'task': task.name,
          'splits': task_splits,
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'seqio_version': seqio.__version__,
          'runner': _runner_name(pipeline_options),
          'base_seed': base_seed,
          'num_examples': {s: _num_examples(out, s) for s in task_splits},
          **task_provenance(task),
      }
      with tf.io.gfile.GFile(os.path.join(out, PROVENANCE_FILE), 'w') as f:
        json.dump(record, f, indent=2, sort_keys=True)
      _install(out, final_dir)
      written.append(final_dir)
      logger.info("Cached task '%s': %s examples in %s", task.name, record['num_examples'],
                     final_dir)
  except BaseException:
    for out in tmp_dirs.values():
      if tf.io.gfile.exists(out):
        logger.error('Caching failed; removing the unfinished %s (existing caches are untouched)',
                     out)
        tf.io.gfile.rmtree(out)
    raise
  logger.info('Token caching took %.1f s', time.time() - started)
  return written


def _num_examples(task_dir: str, split: str) -> Optional[int]:
  tf = _tf()
  seqio = _seqio()
  try:
    with tf.io.gfile.GFile(seqio.get_cached_stats_path(task_dir, split)) as f:
      return int(json.load(f).get('examples', 0))
  except (tf.errors.NotFoundError, ValueError):
    return None
