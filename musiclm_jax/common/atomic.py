"""Atomic file writes: a temporary file beside the target, renamed over it.

A reader sees the old file or the new one, never half of one; a failure (an exception, a full
disk) removes the temporary file and leaves an existing target as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def write_atomically(path: str, write: Callable[[str], Any], suffix: str = '',
                     durable: bool = False) -> str:
  """Calls `write(tmp)` on a temporary file beside `path`, then renames it into place.

  The parent directory is created; the file gets the mode a plain open() would give it.

  Args:
    path: the target.
    write: writes the whole content to the path it is given.
    suffix: the temporary file's suffix (for writers that choose a format by it, e.g. '.wav').
    durable: fsync the file before the rename and the folder after it, so the new content
      survives a power cut (configs and journals that a resume reads).

  Returns:
    `path`.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.tmp-', suffix=suffix,
                             dir=directory)
  os.close(fd)
  try:
    write(tmp)
    # mkstemp makes the file 0600; give it the mode a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if durable:
      with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  if durable:
    _fsync_directory(directory)
  return path


def write_text(path: str, text: str, durable: bool = False) -> str:
  """Writes `text` (UTF-8) to `path` atomically."""
  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
  return write_atomically(path, write, durable=durable)


def write_json(path: str, value: Any, indent: int = 2, sort_keys: bool = True,
               durable: bool = False) -> str:
  """Writes `value` as JSON (with a final newline) to `path` atomically."""
  return write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + '\n',
                    durable=durable)


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # a platform without directory handles
  try:
    os.fsync(fd)
  except OSError:
    pass  # some file systems refuse fsync on a directory; the rename is still atomic
  finally:
    os.close(fd)
