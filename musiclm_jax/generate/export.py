"""Slim inference copies of trained runs: parameters only plus a JSON record, written atomically.

A `musiclm-jax train` run directory holds the whole train state of every checkpoint (optimizer
moments, the codec's discriminators, RNG, counters) and rebuilds its model from the operative
config.gin. Sampling needs only the network and its weights, so the parts of a pipeline folder
(musiclm_jax/generate/pipeline.py) are exported once into directories in the format of
musiclm_jax/data/model_dir.py:

  codec dir   codec.json (the SoundStream's configuration, rebuilt by `module_from_config`,
              hop, levels, codes, sample rate, source run and step, params fingerprint)
              variables/ {'params': {'generator': <SoundStream params, EMA copy when the run
                                                  kept one>,
                                     'quantizer_state': <the RVQ codebooks>}}
  stage dir   stage.json (the StageSpec and TransformerConfig, the training crop in seconds,
              conditioning dropout, source run and step, params fingerprint)
              variables/ {'params': <the stage Decoder's own parameter tree>}

`export_codec(run_dir, out_dir)` / `export_stage(run_dir, out_dir)` make them from runs;
`save_codec` / `save_stage` from a module and its parameters (e.g. a random initialisation in
tests); `load_codec_dir` / `load_stage_dir` read them back. Parameters may be stored as
bfloat16 (`params_dtype='bfloat16'`, half the bytes); they are cast back to the network's
parameter dtype when loaded. Nothing is pickled: configurations are JSON and only classes of
this package are rebuilt.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.data.integrity import check_params
from musiclm_jax.data.model_dir import VARIABLES, read_model_record, save_model_dir
from musiclm_jax.data.module_records import module_config, module_from_config

CODEC_RECORD = 'codec.json'
CODEC_FORMAT = 'musiclm_jax.codec/1'
STAGE_RECORD = 'stage.json'
STAGE_FORMAT = 'musiclm_jax.stage/1'
PARAMS_DTYPES = ('float32', 'bfloat16')


def _host_params(tree: Any, dtype: Optional[str] = None) -> Any:
  """Unboxed numpy copy of a parameter tree; floating leaves cast to `dtype` when given."""
  if dtype is not None and dtype not in PARAMS_DTYPES:
    raise ValueError(f'params_dtype must be one of {PARAMS_DTYPES}, got {dtype!r}')
  target = None if dtype is None else jnp.dtype(dtype)

  def convert(x):
    x = np.asarray(jax.device_get(x))
    if target is not None and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(target)
    return x

  return jax.tree_util.tree_map(convert, nn.meta.unbox(tree))


def _cast_floating(tree: Any, dtype: Any) -> Any:
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x).astype(dtype) if jnp.issubdtype(np.asarray(x).dtype, jnp.floating)
      else np.asarray(x), tree)


def _restore(directory: str) -> Any:
  from musiclm_jax.data.frozen_tokenizer import _restore_numpy  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(directory), VARIABLES)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: missing (the directory is incomplete; export it again)')
  return _restore_numpy(path, {'params': 'params'})['params']


# ---------------------------------------------------------------------------------------------
# The codec.


def save_codec(out_dir: str, generator: Any, variables: Any, *,
               params_dtype: str = 'float32', info: Optional[dict[str, Any]] = None,
               overwrite: bool = False) -> str:
  """Writes a codec directory (module docstring) for a SoundStream and its variables.

  Args:
    out_dir: the directory (refused if it exists, unless `overwrite`).
    generator: the `SoundStream` module.
    variables: {'params': ..., 'quantizer_state': ...} (as `CodecModel.generator_variables`).
    params_dtype: 'float32' or 'bfloat16' for the network's parameters (the RVQ codebooks
      stay float32).
    info: more entries for codec.json (provenance).
    overwrite: replace an existing directory (only once the new one is complete).

  Returns:
    The directory's absolute path.
  """
  from musiclm_jax.data.frozen_tokenizer import fingerprint  # pylint: disable=g-import-not-at-top
  from musiclm_jax.nn.quantizer import STATE_COLLECTION  # pylint: disable=g-import-not-at-top
  missing = [k for k in ('params', STATE_COLLECTION) if k not in variables]
  if missing:
    raise ValueError(f'save_codec: variables lack {missing} (pass the generator variables: '
                     "{'params', 'quantizer_state'})")
  params = {'generator': _host_params(variables['params'], params_dtype),
            STATE_COLLECTION: _host_params(variables[STATE_COLLECTION])}
  record = {'format': CODEC_FORMAT, 'soundstream': module_config(generator),
            'sample_rate': int(generator.sample_rate), 'hop_length': int(generator.hop_length),
            'num_levels': int(generator.num_levels),
            'codebook_size': int(generator.codebook_size), 'params_dtype': params_dtype,
            'params_sha256': fingerprint({'params': params}), **(info or {})}
  return save_model_dir(out_dir, params, record, CODEC_RECORD, overwrite=overwrite)


def export_codec(run_dir: str, out_dir: str, *, step: Optional[int] = None,
                 params_dtype: str = 'float32', overwrite: bool = False) -> str:
  """A codec directory from a codec training run (its EMA generator weights when kept).

  Loading the run parses its config.gin into gin (clearing the caller's bindings).
  """
  from musiclm_jax.codec.model import load_codec  # pylint: disable=g-import-not-at-top
  model, params, model_state, restored = load_codec(run_dir, step)
  variables = model.generator_variables(params, model_state)
  return save_codec(out_dir, model.generator, variables, params_dtype=params_dtype,
                    info={'source': {'run_dir': os.path.abspath(run_dir), 'step': int(restored),
                                     'ema': 'ema_generator' in model_state}},
                    overwrite=overwrite)


def read_codec_record(codec_dir: str) -> dict[str, Any]:
  return read_model_record(codec_dir, CODEC_RECORD, CODEC_FORMAT, 'codec',
                           'export one from a codec run with musiclm_jax.generate.export.'
                           'export_codec')


def load_codec_dir(codec_dir: str, verify: bool = True) -> tuple[Any, dict[str, Any]]:
  """(SoundStream module, its variables {'params', 'quantizer_state'}) of a codec directory.

  The weights are checked against codec.json's params_sha256 (`IntegrityError` when they
  differ) unless `verify=False`.
  """
  from musiclm_jax.codec.soundstream import SoundStream  # pylint: disable=g-import-not-at-top
  from musiclm_jax.nn.quantizer import STATE_COLLECTION  # pylint: disable=g-import-not-at-top
  record = read_codec_record(codec_dir)
  generator = module_from_config(record['soundstream'], f'{codec_dir}/{CODEC_RECORD}: soundstream')
  if not isinstance(generator, SoundStream):
    raise ValueError(f'{codec_dir}/{CODEC_RECORD}: the model is a {type(generator).__name__}, '
                     'not a SoundStream')
  saved = _restore(codec_dir)
  check_params(saved, record, f'the codec ({codec_dir})', verify)
  variables = {'params': _cast_floating(saved['generator'], generator.param_dtype),
               STATE_COLLECTION: saved[STATE_COLLECTION]}
  return generator, variables


# ---------------------------------------------------------------------------------------------
# The stage LMs.


def spec_to_json(spec: Any) -> dict[str, Any]:
  """A StageSpec as plain JSON (every field of the spec and of each TokenStream)."""
  return {'name': spec.name, 'sample_rate': int(spec.sample_rate),
          'conditions': [dataclasses.asdict(s) for s in spec.conditions],
          'target': dataclasses.asdict(spec.target)}


def spec_from_json(record: dict[str, Any]) -> Any:
  """The inverse of `spec_to_json` (raises ValueError naming an unknown or missing field)."""
  from musiclm_jax.stages.spec import StageSpec, TokenStream  # pylint: disable=g-import-not-at-top
  known = {f.name for f in dataclasses.fields(TokenStream)}

  def stream(entry):
    unknown = sorted(set(entry) - known)
    if unknown:
      raise ValueError(f'stage.json: unknown TokenStream fields {unknown}')
    return TokenStream(**entry)

  try:
    return StageSpec(record['name'], tuple(stream(s) for s in record['conditions']),
                     stream(record['target']), int(record.get('sample_rate', 24000)))
  except (KeyError, TypeError) as e:
    raise ValueError(f'stage.json: malformed spec ({e})') from e


def save_stage(out_dir: str, model: Any, params: Any, *, crop_seconds: float,
               params_dtype: str = 'float32', info: Optional[dict[str, Any]] = None,
               overwrite: bool = False) -> str:
  """Writes a stage directory (module docstring) for a StageModel and its Decoder's parameters.

  Args:
    out_dir: the directory (refused if it exists, unless `overwrite`).
    model: the `StageModel` (its spec, Transformer config and conditioning dropout are
      recorded).
    params: the Decoder's parameter tree (a train state's params['model']), boxed or not.
    crop_seconds: the crop the stage was trained on (the sampler's default window).
    params_dtype: 'float32' or 'bfloat16'.
    info: more entries for stage.json (provenance).
    overwrite: replace an existing directory (only once the new one is complete).

  Returns:
    The directory's absolute path.
  """
  from musiclm_jax.data.frozen_tokenizer import fingerprint  # pylint: disable=g-import-not-at-top
  from musiclm_jax.nn.transformer import count_params  # pylint: disable=g-import-not-at-top
  spec = model.spec
  spec.crop_samples(crop_seconds)  # raises unless whole frames of every stream
  host = _host_params(params, params_dtype)
  record = {'format': STAGE_FORMAT, 'stage': spec.name, 'spec': spec_to_json(spec),
            'transformer': module_config(model.config), 'crop_seconds': float(crop_seconds),
            'conditioning_dropout': float(getattr(model, 'conditioning_dropout', 0.0)),
            'vocab_size': int(model.config.vocab_size), 'spec_vocab_size': int(spec.vocab_size),
            'num_params': int(count_params(host)), 'params_dtype': params_dtype,
            'params_sha256': fingerprint({'params': host}), **(info or {})}
  return save_model_dir(out_dir, host, record, STAGE_RECORD, overwrite=overwrite)


def _stage_batch_spec(model) -> dict[str, jax.ShapeDtypeStruct]:
  # Shapes only set the train state's structure, which does not depend on the length.
  shape = (jax.device_count(), 8)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32)
          for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')}


def _run_crop_seconds() -> Optional[float]:
  """CROP_SECONDS of the config.gin that load_run parsed (the run files all define it)."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return float(gin.query_parameter('CROP_SECONDS/macro.value'))
  except (ValueError, KeyError, TypeError):
    return None


def export_stage(run_dir: str, out_dir: str, *, step: Optional[int] = None,
                 crop_seconds: Optional[float] = None, params_dtype: str = 'float32',
                 overwrite: bool = False) -> str:
  """A stage directory from a stage training run: parameters only, no optimizer state.

  Args:
    run_dir: a `musiclm-jax train` run of runs/train_{semantic,coarse,fine}_stage.gin.
    out_dir: the stage directory to write.
    step: the checkpoint (None: the latest readable).
    crop_seconds: the training crop; None reads CROP_SECONDS from the run's config.gin.
    params_dtype: 'float32' or 'bfloat16' (half the bytes; cast back when loaded).
    overwrite: replace an existing out_dir (only once the new one is complete).

  Loading the run parses its config.gin into gin (clearing the caller's bindings).

  Returns:
    The directory's absolute path.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.loading import load_run  # pylint: disable=g-import-not-at-top
  try:
    model, params, _, restored = load_run(run_dir, StageModel, _stage_batch_spec, step,
                                          what='stage run')
    if crop_seconds is None:
      crop_seconds = _run_crop_seconds()
  finally:
    gin.clear_config(clear_constants=False)
  if crop_seconds is None:
    raise ValueError(f'{run_dir}/config.gin defines no CROP_SECONDS; pass crop_seconds (the '
                     'crop the stage was trained on)')
  return save_stage(out_dir, model, params['model'], crop_seconds=crop_seconds,
                    params_dtype=params_dtype,
                    info={'source': {'run_dir': os.path.abspath(run_dir),
                                     'step': int(restored)}},
                    overwrite=overwrite)


def read_stage_record(stage_dir: str) -> dict[str, Any]:
  return read_model_record(stage_dir, STAGE_RECORD, STAGE_FORMAT, 'stage',
                           'export one from a stage run with musiclm_jax.generate.export.'
                           'export_stage')


def stage_model_from_record(record: dict[str, Any], where: str = STAGE_RECORD) -> Any:
  """The StageModel a stage.json describes (no weights); `where` names the file in errors."""
  from musiclm_jax.nn.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  spec = spec_from_json(record['spec'])
  config = module_from_config(record['transformer'], f'{where}: transformer')
  if not isinstance(config, TransformerConfig):
    raise ValueError(f"{where}: 'transformer' must describe a TransformerConfig, got "
                     f'{type(config).__name__}')
  if int(record.get('vocab_size', config.vocab_size)) != config.vocab_size:
    raise ValueError(f"{where}: vocab_size {record['vocab_size']} != the Transformer's "
                     f'{config.vocab_size}')
  # The dropout is a training setting, kept for the record; only a stage with droppable streams
  # takes it (StageModel warns about one without).
  dropout = float(record.get('conditioning_dropout', 0.0)) if spec.droppable else 0.0
  return StageModel(spec, config, conditioning_dropout=dropout)


def load_stage_dir(stage_dir: str, verify: bool = True) -> tuple[Any, Any, dict[str, Any]]:
  """(StageModel, the Decoder's params as numpy in its param dtype, stage.json) of a stage dir.

  The weights are checked against stage.json's params_sha256 (`IntegrityError` when they
  differ) unless `verify=False`.
  """
  record = read_stage_record(stage_dir)
  model = stage_model_from_record(record, os.path.join(stage_dir, STAGE_RECORD))
  saved = _restore(stage_dir)
  check_params(saved, record, f'the {record.get("stage", "")} stage ({stage_dir})', verify)
  params = _cast_floating(saved, model.config.param_dtype)
  shapes = jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 2), jnp.int32)))['params']
  expected = jax.tree_util.tree_map(lambda s: tuple(s.shape), nn.meta.unbox(shapes))
  got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
  if expected != got:
    raise ValueError(f'{stage_dir}: the saved parameters do not fit the Transformer that '
                     'stage.json describes (another export overwrote variables/?)')
  return model, params, record


def describe_dir_size(directory: str) -> int:
  """Bytes under a directory (for reports)."""
  total = 0
  for root, _, files in os.walk(directory):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


__all__ = ['export_codec', 'export_stage', 'load_codec_dir', 'load_stage_dir',
           'read_codec_record', 'read_stage_record', 'save_codec', 'save_stage',
           'spec_from_json', 'spec_to_json', 'stage_model_from_record']
