"""The one entry point: `musiclm-jax SUBCOMMAND --gin_file=... --gin.NAME=VALUE ...` (T5X flags).

Subcommands:
  train     gin-configured `musiclm_jax.train.trainer.train`
  eval      gin-configured: a pipeline folder's evaluation over a corpus split (FAD, KLD, MCC,
            attributes, melody, per-stage diagnostics: `musiclm_jax.evaluation.pipeline_eval
            .evaluate_pipeline`, --gin_file=runs/eval.gin) when the gin files bind
            evaluate_pipeline; else a training checkpoint's teacher-forced evaluation
            (`musiclm_jax.train.trainer.evaluate`, --gin_file=runs/eval_checkpoint.gin)
  tokenize  gin-configured `musiclm_jax.data.token_cache.cache_tasks`: run SeqIO tasks' frozen
            tokenizers on Apache Beam and cache the tokens (--gin_file=runs/tokenize.gin)
  build_data  gin-configured `musiclm_jax.data.build.build_dataset`: prepare an audio corpus as
            a TFDS dataset (--gin_file=data/embedded_music.gin, data/musiccaps.gin,
            data/audio_folder.gin)
  assemble_pipeline  gin-configured `musiclm_jax.generate.pipeline.assemble_pipeline`: a
            pipeline folder from the trained parts (--gin_file=runs/assemble_pipeline.gin)
  train_pipeline  gin-configured `musiclm_jax.train.recipe.train_pipeline`: every part of a
            pipeline in order, each as its own musiclm-jax command, skipping the parts done and
            resuming an interrupted one (--gin_file=pipelines/tiny.gin)
  compile   gin-configured `musiclm_jax.train.compile.compile_train_step`: the train step of a
            run file + model file lowered and compiled on a simulated mesh, with memory per
            device and a projection onto pod slices; no data needed (runs/compile.gin is added)
  ship_pipeline  gin-configured `musiclm_jax.generate.ship.ship_pipeline`: a pipeline folder
            copied with a manifest (sha256s, recipe, eval summary), by default into the package
            (--gin_file=runs/ship_pipeline.gin)
  sample    plain flags, not gin: `musiclm-jax sample --checkpoint PIPELINE_DIR --prompt TEXT
            --seconds 30 --out out.wav [--melody F] [--continue F] [--story "a:15|b:15"]`
            (musiclm_jax/generate/cli.py; `musiclm-jax sample --help`)
  demo      plain flags: captions, a hummed melody and a story from a pipeline folder (default:
            the shipped tiny one) as wavs, spectrograms and an HTML page
            (musiclm_jax/generate/demo.py; `musiclm-jax demo --help`)
  memorization  plain flags: the semantic stage's memorization check (MusicLM section 5),
            `musiclm-jax memorization --stage_dir=DIR --cache_dir=DIR --split=train`
            (musiclm_jax/generate/memorization.py; `--help`)
  sweep     plain flags: a gin grid as run folders, run in turn, one table of final metrics,
            `musiclm-jax sweep --gin_file=F --grid "NAME=[V1, V2]" --sweep_dir=DIR [--dry_run]`
            (musiclm_jax/train/sweep.py; `--help`)
  codec_report  plain flags: what a codec keeps level by level beside Opus, on any folder of
            audio, `musiclm-jax codec_report --codec DIR --audio_dir DIR --out_dir DIR`
            (musiclm_jax/evaluation/codec_report.py; `--help`)

Flags (each may repeat):
  --gin_file=PATH              a gin file (searched in --gin_search_paths, the working directory
                               and this checkout's gin_configs/)
  --gin.NAME=VALUE             a binding, e.g. --gin.MODEL_DIR="'runs/toy'" --gin.TRAIN_STEPS=50
  --gin_search_paths=A,B       more directories for gin files and their includes
  --module_import=MODULE       import a module first (registers SeqIO tasks or gin configurables)
Multi-host (one command per host):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  --coordinator_address=auto   (TPU pods, SLURM, Open MPI: jax.distributed.initialize() finds them)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence

# Subcommand -> (module, gin-configurable function) it runs.
COMMANDS = {
    'train': ('musiclm_jax.train.trainer', 'train'),
    'eval': ('musiclm_jax.train.trainer', 'evaluate'),
    'tokenize': ('musiclm_jax.data.token_cache', 'cache_tasks'),
    'build_data': ('musiclm_jax.data.build', 'build_dataset'),
    'fit_kmeans': ('musiclm_jax.semantic.tokenizer', 'fit_kmeans'),
    'fit_text_vocab': ('musiclm_jax.mulan.vocabulary', 'fit_text_vocab'),
    'fit_conditioner': ('musiclm_jax.mulan.conditioning', 'fit_conditioner'),
    'fit_melody_conditioner': ('musiclm_jax.melody.conditioning', 'fit_melody_conditioner'),
    'assemble_pipeline': ('musiclm_jax.generate.pipeline', 'assemble_pipeline'),
    'compile': ('musiclm_jax.train.compile', 'compile_train_step'),
    'train_pipeline': ('musiclm_jax.train.recipe', 'train_pipeline'),
    'ship_pipeline': ('musiclm_jax.generate.ship', 'ship_pipeline'),
}
SUBCOMMANDS = tuple(COMMANDS)
# `eval` runs this instead of trainer.evaluate when the gin files bind it (runs/eval.gin); the
# parameter each run file binds tells which evaluation a config asks for.
EVAL_PIPELINE = ('musiclm_jax.evaluation.pipeline_eval', 'evaluate_pipeline')
_EVAL_KEYS = {'pipeline': 'evaluate_pipeline.pipeline_dir', 'checkpoint': 'evaluate.model_dir'}
# Subcommands with their own plain flags (no gin): name -> (module, function(argv) -> status).
PLAIN_COMMANDS = {
    'sample': ('musiclm_jax.generate.cli', 'sample_main'),
    'memorization': ('musiclm_jax.generate.memorization', 'main'),
    'demo': ('musiclm_jax.generate.demo', 'main'),
    'sweep': ('musiclm_jax.train.sweep', 'main'),
    'codec_report': ('musiclm_jax.evaluation.codec_report', 'main'),
}
# Data jobs report progress at INFO; training reports through its progress bar and summaries.
# Gin files a subcommand adds after the user's (bindings on the command line still win).
_ADDED_GIN_FILES = {'compile': ('runs/compile.gin',)}
_INFO_BY_DEFAULT = ('tokenize', 'build_data', 'fit_kmeans', 'fit_conditioner', 'fit_text_vocab',
                    'fit_melody_conditioner')
REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'gin_configs')


_ADDED_SEARCH_PATHS: set[str] = set()


class UsageError(Exception):
  """A bad flag, gin file or binding: reported in one line, exit status 2."""


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(gin bindings 'NAME=VALUE' from `--gin.NAME=VALUE` / `--gin.NAME VALUE`, the other args)."""
  bindings, rest = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith('--gin.'):
      body = arg[len('--gin.'):]
      if '=' not in body:
        if i + 1 >= len(args):
          raise UsageError(f'{arg}: expected --gin.NAME=VALUE')
        body = f'{body}={args[i + 1]}'
        i += 1
      bindings.append(body)
    else:
      rest.append(arg)
    i += 1
  return bindings, rest


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits T5X-style flags; `--gin.NAME=VALUE` become gin binding strings `NAME=VALUE`."""
  bindings, rest = split_gin_flags(argv)
  parser = argparse.ArgumentParser(prog='musiclm-jax', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', choices=SUBCOMMANDS)
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_search_paths', action='append', default=[])
  parser.add_argument('--module_import', action='append', default=[])
  parser.add_argument('--coordinator_address', default=None)
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--log_level', default=None,
                      help='Python log level (default: INFO for tokenize, else WARNING)')
  ns = parser.parse_args(rest)
  return ns, bindings


def initialize_distributed(coordinator_address: str, num_processes: Optional[int],
                           process_id: Optional[int]):
  """Joins this process to a multi-process run (before JAX's first use of a device).

  Args:
    coordinator_address: HOST:PORT of process 0's coordination service, or 'auto' to let JAX
      discover the cluster (TPU pods, SLURM, Open MPI).
    num_processes: processes in the run (None with 'auto').
    process_id: this process's index, 0 .. num_processes - 1 (None with 'auto').
  """
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address == 'auto':
    jax.distributed.initialize()
    return
  # Processes on CPU exchange collectives through gloo; older JAX defaults to none at all.
  if jax.config.values.get('jax_cpu_collectives_implementation') == 'none':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def setup_compilation_cache():
  """Persistent XLA compilation cache outside the repository (repeat runs skip compiles)."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get('MUSICLM_JAX_COMPILATION_CACHE',
                         os.path.join(os.path.expanduser('~'), '.cache', 'musiclm_jax', 'xla'))
  if cache and cache.lower() != 'none':
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


class _GinSearchNoise(logging.Filter):
  """Drops gin's 'Path not found' errors logged while it tries each search path for a file."""

  def filter(self, record):
    return not record.pathname.endswith(os.path.join('gin', 'resource_reader.py'))


def _guard_gin_package_paths():
  """Makes gin skip, not crash on, a relative path whose first part is a namespace package.

  gin tries 'runs/train.gin' as the resource `train.gin` of a Python package `runs`; when the
  working directory is on sys.path and holds a plain ./runs directory (a run directory), that is
  a namespace package without a file, and gin 0.5 fails with a TypeError instead of moving on to
  its search paths. Raising ValueError ("no such package") lets it move on.
  """
  from gin import resource_reader  # pylint: disable=g-import-not-at-top
  original = resource_reader._parse_config_path  # pylint: disable=protected-access
  if getattr(original, 'guarded', False):
    return

  def parse_config_path(config_path):
    head = os.path.split(config_path)[0]
    spec = importlib.util.find_spec(head.replace('/', '.')) if head else None
    if spec is None or spec.origin is None:
      raise ValueError('Package not found', head)
    return original(config_path)

  parse_config_path.guarded = True
  resource_reader._parse_config_path = parse_config_path  # pylint: disable=protected-access


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()):
  """Parses gin files and bindings; raises UsageError naming the file or binding at fault."""
  import gin  # pylint: disable=g-import-not-at-top
  import musiclm_jax.gin_configurables  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  _guard_gin_package_paths()
  paths = []
  for entry in search_paths:
    paths.extend(p for p in entry.split(',') if p)
  paths += [os.getcwd(), REPO_GIN_DIR]
  for p in paths:
    if p not in _ADDED_SEARCH_PATHS:  # gin keeps a global list; add each directory once
      gin.add_config_file_search_path(p)
      _ADDED_SEARCH_PATHS.add(p)
  resolved = []
  for f in gin_files:
    found = [os.path.join(p, f) for p in [''] + paths if os.path.isfile(os.path.join(p, f))]
    if not found:
      raise UsageError(f'--gin_file={f}: not found (searched {", ".join(paths)})')
    # Absolute paths: gin reads a relative 'a/b.gin' as resource b.gin of a Python package `a`
    # when one is importable, and a run directory such as ./runs is (a namespace package).
    resolved.append(os.path.abspath(found[0]))
  noise = _GinSearchNoise()
  logging.getLogger().addFilter(noise)
  try:
    gin.parse_config_files_and_bindings(resolved, None, finalize_config=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'gin file error in {", ".join(gin_files)}: {e}') from e
  finally:
    logging.getLogger().removeFilter(noise)
  for b in bindings:
    try:
      gin.parse_config(b)
    except Exception as e:  # pylint: disable=broad-except
      raise UsageError(f'--gin.{b}: {str(e).splitlines()[0]}') from e
  try:
    gin.finalize()  # runs gin's check that every %gin.REQUIRED macro was set
  except ValueError as e:
    message = str(e).splitlines()[0]
    if 'gin.REQUIRED' in message:
      name = message.split('/')[0]
      raise UsageError(f'required gin macro {name} is not set (pass --gin.{name}=VALUE): '
                       f'{message}') from e
    raise UsageError(message) from e


def _gin_binds(key: str) -> bool:
  """Whether the parsed gin config binds `configurable.parameter` (a macro counts)."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    gin.query_parameter(key)
  except ValueError:
    return False
  return True


def eval_target() -> tuple[str, str]:
  """(module, function) the `eval` subcommand runs for the parsed gin config.

  Raises:
    UsageError: the config binds both evaluations.
  """
  if not _gin_binds(_EVAL_KEYS['pipeline']):
    return COMMANDS['eval']
  if _gin_binds(_EVAL_KEYS['checkpoint']):
    raise UsageError('eval: the gin files bind both evaluate (a training checkpoint: '
                     'runs/eval_checkpoint.gin) and evaluate_pipeline (a pipeline folder: '
                     'runs/eval.gin); include one of them')
  return EVAL_PIPELINE


def run(argv: Sequence[str]) -> int:
  ns, bindings = parse_flags(argv)
  level_name = ns.log_level or ('INFO' if ns.command in _INFO_BY_DEFAULT else 'WARNING')
  level = getattr(logging, level_name.upper(), logging.WARNING)
  logging.basicConfig(level=level, format='%(levelname)s %(name)s: %(message)s')
  if ns.command in _INFO_BY_DEFAULT and level > logging.DEBUG:
    # Progress comes from musiclm_jax's loggers; Beam's and seqio's (absl, which logs whole
    # examples) INFO lines would bury it.
    for name in ('apache_beam', 'absl', 'jax'):
      logging.getLogger(name).setLevel(max(level, logging.WARNING))
  import jax  # pylint: disable=g-import-not-at-top
  if ns.coordinator_address:
    initialize_distributed(ns.coordinator_address, ns.num_processes, ns.process_id)
  setup_compilation_cache()
  for module in ns.module_import:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise UsageError(f'--module_import={module}: {e}') from e
  if ns.command in _ADDED_GIN_FILES:
    # Its module registers the configurable the added gin file binds (compile_train_step).
    importlib.import_module(COMMANDS[ns.command][0])
  gin_files = list(ns.gin_file)
  gin_files += [f for f in _ADDED_GIN_FILES.get(ns.command, ()) if f not in gin_files]
  parse_gin(gin_files, bindings, ns.gin_search_paths)
  module_name, fn_name = eval_target() if ns.command == 'eval' else COMMANDS[ns.command]
  fn = getattr(importlib.import_module(module_name), fn_name)
  # Imported once the flags above have set up JAX, logging and the compilation cache.
  from musiclm_jax.data import build  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import integrity  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import model_dir  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import module_records  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import token_cache  # pylint: disable=g-import-not-at-top
  from musiclm_jax.evaluation import pipeline_eval  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate import ship  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train import recipe  # pylint: disable=g-import-not-at-top
  try:
    fn()
  except (ValueError, TypeError, RuntimeError) as e:
    lines = [l for l in str(e).splitlines() if 'In call to configurable' not in l]
    if isinstance(e, (checkpoints.CheckpointError, checkpoints.ModelDirLockedError,
                      model_dir.InterruptedReplaceError)):
      # A run that would lose or overwrite what was written, or a replace to finish by hand:
      # the whole message (each step and why, or the commands that restore), nothing changed.
      raise UsageError(f'{ns.command}: ' + '\n'.join(lines)) from e
    if isinstance(e, (integrity.IntegrityError, module_records.RecordError)):
      # A damaged or edited folder, a record naming what a folder may not: one line.
      raise UsageError(f'{ns.command}: {lines[0]}') from e
    if isinstance(e, build.BuildError):
      raise UsageError(f'build_data: {str(e).splitlines()[0]}') from e
    if isinstance(e, pipeline_eval.EvalError):
      # A missing pipeline folder, an unbuilt dataset, too few clips: one line.
      raise UsageError(f'eval: {lines[0]}') from e
    if isinstance(e, (recipe.RecipeError, ship.ShipError)):
      # A recipe step that failed (its log named), a bad step list, a pipeline too large to
      # ship: one line.
      raise UsageError(f'{ns.command}: {lines[0]}') from e
    if isinstance(e, token_cache.CacheError):
      # A refusal (an existing cache, an unregistered task): one line, nothing was changed.
      raise UsageError('tokenize: ' + '\n'.join(lines)) from e
    # A gin.REQUIRED parameter left unbound: a usage error naming it. Anything else is a bug or
    # a data problem and keeps its traceback.
    message = str(e)
    if message.startswith('Required bindings for'):
      raise UsageError(f'{ns.command}: {message.splitlines()[0]}') from e
    raise
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in PLAIN_COMMANDS:
    module_name, fn_name = PLAIN_COMMANDS[argv[0]]
    return getattr(importlib.import_module(module_name), fn_name)(argv[1:])
  try:
    return run(argv)
  except UsageError as e:
    print(f'musiclm-jax: error: {e}', file=sys.stderr)
    return 2


def console_entry():
  sys.exit(main())


if __name__ == '__main__':
  console_entry()
