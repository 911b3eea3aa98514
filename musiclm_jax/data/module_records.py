"""Network configurations as JSON, and the one way back: only registered classes and fields.

A frozen-model folder (codec, stage, MuLan and melody conditioners) describes its network in its
JSON record (`module_config`), and loading the folder rebuilds it (`module_from_config`). Folders
are shared between users, so the record is data, never code: `module_from_config` builds only
the classes in `RECORD_CLASSES`, with only the fields those classes declare, from JSON values
(numbers, strings, booleans, null, tuples, dtypes from `RECORD_DTYPES`, and nested registered
classes). Anything else is refused with a `RecordError` naming the file and the key.

To let a record name a new class, add its dotted name to `RECORD_CLASSES` (a dataclass or Flax
module whose fields are plain values or other registered classes).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax.numpy as jnp

# The classes a record may name. Each module is imported by this exact name only when a record
# names the class (the registry must not import the model packages: data/ sits below them).
RECORD_CLASSES = frozenset({
    'musiclm_jax.audio.features.LogMelFrontEnd',
    'musiclm_jax.codec.soundstream.SoundStream',
    'musiclm_jax.melody.encoder.MelodyEncoder',
    'musiclm_jax.melody.encoder.PitchFrontEnd',
    'musiclm_jax.mulan.audio.ResNetAudioTower',
    'musiclm_jax.mulan.audio.SpectrogramTransformerTower',
    'musiclm_jax.mulan.model.MuLan',
    'musiclm_jax.mulan.text.BertEncoder',
    'musiclm_jax.nn.transformer.TransformerConfig',
})
RECORD_DTYPES = frozenset({'float32', 'bfloat16', 'float16', 'float64', 'int8', 'int16', 'int32',
                           'int64', 'uint8', 'bool'})
_MARKERS = ('__class__', '__tuple__', '__dtype__')
# Flax's bookkeeping fields: not part of a network's configuration.
_SKIPPED_FIELDS = ('parent', 'name')


class RecordError(ValueError):
  """A record names a class, field or value that a folder may not name (the message says which)."""


def module_config(obj: Any) -> Any:
  """JSON-able description of a (Flax) dataclass tree: class path, fields, dtypes, tuples."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    out = {'__class__': f'{type(obj).__module__}.{type(obj).__qualname__}'}
    for f in dataclasses.fields(obj):
      if f.name in _SKIPPED_FIELDS or not f.init:
        continue
      out[f.name] = module_config(getattr(obj, f.name))
    return out
  if isinstance(obj, (tuple, list)):
    return {'__tuple__': [module_config(v) for v in obj]}
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  try:
    return {'__dtype__': jnp.dtype(obj).name}
  except TypeError as e:
    raise TypeError(f'cannot describe {obj!r} ({type(obj).__name__}) in JSON') from e


def record_fields(cls: type) -> frozenset[str]:
  """The fields a record may give for `cls`: its dataclass init fields, less Flax's own."""
  return frozenset(f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in _SKIPPED_FIELDS)


def _registered_class(path: Any, where: str) -> type:
  if not isinstance(path, str) or path not in RECORD_CLASSES:
    raise RecordError(f'{where}: refusing to build {path!r}: not a class a model record may '
                      f'name (musiclm_jax.data.module_records.RECORD_CLASSES)')
  module_name, _, cls_name = path.rpartition('.')
  cls = getattr(importlib.import_module(module_name), cls_name)
  if not dataclasses.is_dataclass(cls):
    raise RecordError(f'{where}: {path} is not a dataclass')
  return cls


def module_from_config(config: Any, where: str = 'record') -> Any:
  """Inverse of `module_config`, from registered classes and their own fields only.

  Args:
    config: the JSON value (`module_config`'s output, read back from a file).
    where: the file and key it came from, for errors (e.g. 'DIR/codec.json: soundstream').

  Raises:
    RecordError: an unregistered class, an unknown field, an unknown dtype, or a value that is
      not JSON data (the message names `where` and the key path).
  """
  if isinstance(config, dict):
    markers = [m for m in _MARKERS if m in config]
    if len(markers) != 1:
      raise RecordError(f'{where}: a JSON object here must hold exactly one of {list(_MARKERS)}, '
                        f'got the keys {sorted(config)}')
    if '__dtype__' in config:
      name = config['__dtype__']
      if len(config) != 1 or name not in RECORD_DTYPES:
        raise RecordError(f'{where}: dtype {name!r} is not one of {sorted(RECORD_DTYPES)}')
      return jnp.dtype(name).type
    if '__tuple__' in config:
      items = config['__tuple__']
      if len(config) != 1 or not isinstance(items, list):
        raise RecordError(f"{where}: '__tuple__' must be the object's only key, with a list")
      return tuple(module_from_config(v, f'{where}[{i}]') for i, v in enumerate(items))
    path = config['__class__']
    cls = _registered_class(path, where)
    allowed = record_fields(cls)
    unknown = sorted(k for k in config if k != '__class__' and k not in allowed)
    if unknown:
      raise RecordError(f'{where}: {path} has no field(s) {unknown} (its fields: '
                        f'{sorted(allowed)})')
    kwargs = {k: module_from_config(v, f'{where}.{k}') for k, v in config.items()
              if k != '__class__'}
    try:
      return cls(**kwargs)
    except (TypeError, ValueError) as e:
      raise RecordError(f'{where}: cannot build {path}: {e}') from e
  if config is None or isinstance(config, (bool, int, float, str)):
    return config
  raise RecordError(f'{where}: {type(config).__name__} values are not allowed in a model record')
