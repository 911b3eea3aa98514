"""Checks that a frozen-model or pipeline folder holds the weights and files its records promise.

Every frozen-model record (codec.json, stage.json, tokenizer.json, conditioner.json,
melody_conditioner.json) carries `params_sha256`, the `fingerprint` of the parameters it was
saved with; a shipped pipeline folder also carries manifest.json (every file's sha256). Loaders
check both, so flipped bytes, a truncated file or a part swapped by hand is an `IntegrityError`
naming the part, never silently different audio. Whoever edits weights on purpose loads with
`verify=False`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

logger = logging.getLogger(__name__)

MANIFEST = 'manifest.json'


def fingerprint(tree: Any) -> str:
  """sha256 over a tree's arrays: each leaf's path, dtype, shape and bytes, in sorted path order.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  items = sorted((('/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path), leaf)
                  for path, leaf in leaves), key=lambda item: item[0])
  h = hashlib.sha256()
  for path, leaf in items:
    a = np.asarray(leaf)
    if a.dtype.byteorder == '>':
      a = a.astype(a.dtype.newbyteorder('<'))
    h.update(f'{path}|{a.dtype.name}|{a.shape}|'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class IntegrityError(ValueError):
  """Weights or files differ from what their record or manifest says (the message names them)."""


def check_params(params: Any, record: Mapping[str, Any], where: str, verify: bool = True) -> None:
  """Raises IntegrityError unless `fingerprint({'params': params})` is the record's params_sha256.

  Args:
    params: the restored parameter tree, exactly as saved (before any dtype cast).
    record: the folder's JSON record.
    where: the folder (or part) named in the error.
    verify: False skips the check (weights edited on purpose).
  """
  if not verify:
    return
  expected = record.get('params_sha256')
  if expected is None:
    logger.warning('%s: its record has no params_sha256; the weights are not verified', where)
    return
  got = fingerprint({'params': params})
  if got != expected:
    raise IntegrityError(
        f'{where}: the weights are not the ones its record was saved with (params_sha256 '
        f'{got[:12]}..., recorded {str(expected)[:12]}...): the files were changed or damaged. '
        'Export or ship the part again, or load with verify=False if you edited the weights '
        'on purpose.')


def sha256_of(path: str) -> str:
  """The sha256 of a file's bytes, as hex."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def folder_files(folder: str) -> list[str]:
  """Every file under `folder`, as sorted paths relative to it."""
  out = []
  for parent, _, names in os.walk(folder):
    for name in names:
      out.append(os.path.relpath(os.path.join(parent, name), folder))
  return sorted(out)


def _inside(folder: str, rel: Any) -> bool:
  if not isinstance(rel, str) or not rel or os.path.isabs(rel):
    return False
  root = os.path.realpath(folder)
  return os.path.commonpath([root, os.path.realpath(os.path.join(root, rel))]) == root


def manifest_problems(folder: str) -> list[str]:
  """Problems with a folder against its manifest.json: missing, changed, extra or outside files.
  """
  path = os.path.join(folder, MANIFEST)
  try:
    with open(path) as f:
      listed = json.load(f)['files']
    if not isinstance(listed, dict):
      raise TypeError('files is not an object')
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f'{MANIFEST}: unreadable ({type(e).__name__}: {e})']
  problems = []
  for rel, entry in sorted(listed.items()):
    if not _inside(folder, rel):
      problems.append(f'{rel}: names a path outside the folder')
      continue
    file_path = os.path.join(folder, rel)
    if not os.path.isfile(file_path):
      problems.append(f'{rel}: missing')
    elif not isinstance(entry, dict) or sha256_of(file_path) != entry.get('sha256'):
      problems.append(f'{rel}: sha256 differs from the manifest')
  for rel in folder_files(folder):
    if rel != MANIFEST and rel not in listed:
      problems.append(f'{rel}: not in the manifest')
  return problems


def check_manifest(folder: str, parts: Optional[Mapping[str, str]] = None,
                   verify: bool = True) -> bool:
  """Raises IntegrityError when a file the manifest lists is missing or changed.

  Files the manifest does not list are logged, not refused (a README dropped beside the parts
  changes nothing that loads).

  Args:
    folder: the folder holding manifest.json.
    parts: {part name: its sub-folder} (pipeline.json's 'parts'), to name the part at fault.
    verify: False skips the check.

  Returns:
    Whether there was a manifest to check.
  """
  if not verify or not os.path.isfile(os.path.join(folder, MANIFEST)):
    return False
  problems = manifest_problems(folder)
  extra = [p for p in problems if p.endswith(': not in the manifest')]
  for p in extra:
    logger.warning('%s: %s', folder, p)
  problems = [p for p in problems if p not in extra]
  if problems:
    by_folder = {os.path.normpath(sub): name for name, sub in (parts or {}).items()
                 if isinstance(sub, str)}
    named = []
    for p in problems:
      top = p.split(os.sep, 1)[0].split(':', 1)[0]
      named.append(f'{by_folder[top]} ({p})' if top in by_folder else p)
    raise IntegrityError(
        f'{folder}: the files differ from its {MANIFEST}: ' + '; '.join(named[:5])
        + (f' (and {len(named) - 5} more)' if len(named) > 5 else '')
        + '. Ship the pipeline again, or load with verify=False if you changed it on purpose.')
  return True
