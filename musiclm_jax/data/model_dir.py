"""A frozen model saved as a directory: orbax variables plus a JSON record, written atomically.

Semantic tokenizers (musiclm_jax/semantic/tokenizer.py) and MuLan conditioners
(musiclm_jax/mulan/conditioning.py) are saved this way:

  DIR/variables/   orbax PyTree checkpoint {'params': ...} (read by FrozenTokenizer's 'pytree'
                   layout; tensorstore arrays, nothing pickled)
  DIR/<record>     JSON: format tag, the module's config, provenance, fingerprint of the params
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

VARIABLES = 'variables'


def save_model_dir(directory: str, params: Any, record: dict[str, Any], record_name: str,
                   overwrite: bool = False,
                   extra_files: Optional[Mapping[str, bytes]] = None) -> str:
  """Writes `directory` (variables/ + record_name) atomically; returns its absolute path.

  `extra_files` ({file name: contents}) are written beside the record (e.g. a MuLan
  conditioner's text vocabulary). Everything is written into a staging folder beside it first.
  An existing directory is only replaced with `overwrite`, and then only once the new one is
  complete: it is moved aside and put back if the replacement fails, so a failure never loses
  what was there.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def write(staging: str) -> None:
    with ocp.PyTreeCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, VARIABLES), {'params': params})
    with open(os.path.join(staging, record_name), 'w') as f:
      json.dump(record, f, indent=2, sort_keys=True)
    for name, data in (extra_files or {}).items():
      if os.path.basename(name) != name or name in (record_name, VARIABLES):
        raise ValueError(f'extra file name {name!r}: a plain file name other than '
                         f'{record_name!r} and {VARIABLES!r}')
      with open(os.path.join(staging, name), 'wb') as f:
        f.write(data)

  return write_directory_atomically(directory, write, overwrite=overwrite)


def write_directory_atomically(out_dir: str, write, overwrite: bool = False,
                               overwrite_hint: str = 'overwrite=True') -> str:
  """Calls write(staging) on a staging folder beside out_dir, then renames it into place.

  An existing out_dir is replaced only with overwrite, and only once the new one is complete
  (it is moved aside and put back if the rename fails); a failed write leaves no trace.

  Returns:
    The absolute out_dir.

  Raises:
    FileExistsError: out_dir exists and not overwrite (the message names `overwrite_hint`).
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass {overwrite_hint} to replace it')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}-new-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the folder private
  try:
    write(staging)
    move_into_place(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir


def move_into_place(staging: str, target: str) -> None:
  """Renames the complete folder `staging` to `target`, replacing an existing `target` only once
  `staging` is in place (the old one is moved aside first and restored if the rename fails).

  `staging` should be a sibling of `target` (same file system: each rename is atomic).
  """
  parent = os.path.dirname(os.path.abspath(target))
  old = None
  if os.path.exists(target):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}-old-', dir=parent)
    os.rmdir(old)
    os.replace(target, old)
  try:
    os.replace(staging, target)
  except BaseException:
    if old:
      os.replace(old, target)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)


def read_model_record(directory: str, record_name: str, expected_format: str, what: str,
                      how_to_make: str) -> dict[str, Any]:
  """The JSON record of a saved model directory, its format checked.

  Args:
    directory: the saved directory.
    record_name: the record's file name, e.g. 'tokenizer.json'.
    expected_format: the record's 'format' tag.
    what: the kind of directory, for errors ('semantic tokenizer').
    how_to_make: named in the error when the directory holds no record.
  """
  path = os.path.join(directory, record_name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: not a {what} directory ({how_to_make})')
  with open(path) as f:
    record = json.load(f)
  if record.get('format') != expected_format:
    raise ValueError(f'{path}: format {record.get("format")!r}, expected {expected_format!r}')
  return record
