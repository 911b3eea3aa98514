"""A frozen model saved as a directory, and the recoverable directory replace that writes it.

Semantic tokenizers (musiclm_jax/semantic/tokenizer.py) and MuLan conditioners
(musiclm_jax/mulan/conditioning.py) are saved this way:

  DIR/variables/   orbax PyTree checkpoint {'params': ...} (read by FrozenTokenizer's 'pytree'
                   layout; tensorstore arrays, nothing pickled)
  DIR/<record>     JSON: format tag, the module's config, provenance, fingerprint of the params

Replacing a directory (`move_into_place`, `replacing`; also used by the token cache and the TFDS
builders' `prepare`) takes two renames: the old DIR to its hidden sibling `.DIR.replace-old`,
then the new copy to DIR. Before the first, a journal `.DIR.replace.json` (the writer's host and
pid, its staging folder) is written; it is marked 'replaced' once the new copy is in place, and
removed after the old copy is deleted. A writer killed part way leaves the journal, and the next
call that touches DIR (`recover_replace`: writing it, `read_model_record`, the token cache's
check and build, the builders' prepare) rolls back or finishes the replace:

  DIR missing, old copy present        -> the old copy is renamed back (a warning says so);
  journal says 'replaced'              -> the old copy (and the journal) are deleted;
  both present, the new one not known  -> both are kept; a warning (an error for a writer) gives
    to be complete                        the commands that keep one or the other.

A journal whose writer may still be running (a live process on this host, or any process on
another host) is only reported, never acted on; a dead writer's staging folder is deleted.

On the local file system every file and folder of a new copy is fsynced before it is renamed into
place, the journal before the first rename, and the parent folder after the renames, so a crash
or power cut cannot leave a renamed but empty copy. Other file systems (gs://, through
tf.io.gfile: `GFiles`) are used as they are.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shlex
import shutil
import socket
import stat
import tempfile
from typing import Any, Iterator, Mapping, Optional

logger = logging.getLogger(__name__)

VARIABLES = 'variables'
_ASIDE, _REPLACED = 'aside', 'replaced'
# Journals of the replaces under way in this process: their writer is alive.
_ACTIVE: set[str] = set()


class InterruptedReplaceError(RuntimeError):
  """An earlier replace of a directory is unfinished and cannot be resolved safely here."""


# ------------------------------------------------------------------------------------------------
# Durability.


def fsync_dir(path: str) -> None:
  """fsyncs a folder, so the names in it (a rename, a new file) survive a crash."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # cannot sync folders here
      raise
  finally:
    os.close(fd)


def fsync_tree(path: str) -> None:
  """fsyncs every regular file and folder under `path`, each folder after its contents and
  `path` itself last, so all of it is on disk before `path` is renamed into place.

  Symbolic links are not followed.
  """
  for root, _, names in os.walk(path, topdown=False):
    for name in names:
      file = os.path.join(root, name)
      if stat.S_ISREG(os.lstat(file).st_mode):
        fd = os.open(file, os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)
    fsync_dir(root)


# ------------------------------------------------------------------------------------------------
# The file operations a replace needs.


class LocalFiles:
  """A replace's file operations on the local file system: os renames, with fsync."""
  local = True

  def exists(self, path: str) -> bool:
    return os.path.lexists(path)

  def move(self, src: str, dst: str, into_place: bool) -> None:
    """Renames src to dst; into_place: dst is the target (False: a copy taken out of the way)."""
    del into_place  # one atomic rename either way
    os.replace(src, dst)

  def rmtree(self, path: str) -> None:
    shutil.rmtree(path)

  def remove(self, path: str) -> None:
    os.remove(path)

  def read_text(self, path: str) -> str:
    with open(path) as f:
      return f.read()

  def write_text(self, path: str, text: str) -> None:
    """Writes path durably: path + '.tmp', fsynced, renamed over it; then the folder fsynced."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))

  def sync_tree(self, path: str) -> None:
    fsync_tree(path)

  def sync_dir(self, path: str) -> None:
    fsync_dir(path)


class GFiles(LocalFiles):
  """A replace's file operations through tf.io.gfile (gs:// and the other file systems TensorFlow
  knows). No fsync: an object store makes an object durable when its write returns."""
  local = False

  def __init__(self, gfile):
    self.gfile = gfile

  def exists(self, path: str) -> bool:
    return self.gfile.exists(path)

  def move(self, src: str, dst: str, into_place: bool) -> None:
    del into_place
    self.gfile.rename(src, dst, overwrite=False)

  def rmtree(self, path: str) -> None:
    self.gfile.rmtree(path)

  def remove(self, path: str) -> None:
    self.gfile.remove(path)

  def read_text(self, path: str) -> str:
    with self.gfile.GFile(path) as f:
      return f.read()

  def write_text(self, path: str, text: str) -> None:
    with self.gfile.GFile(path, 'w') as f:
      f.write(text)

  def sync_tree(self, path: str) -> None:
    pass

  def sync_dir(self, path: str) -> None:
    pass


def is_local(path: str) -> bool:
  """Whether path is on the local file system (not a URL such as gs://bucket/...)."""
  return '://' not in os.fspath(path)


def files_for(path: str, gfile=None) -> LocalFiles:
  """LocalFiles for a local path, GFiles(gfile) for a URL (gfile: tf.io.gfile)."""
  if is_local(path):
    return LocalFiles()
  if gfile is None:
    raise ValueError(f'{path} is not a local path: pass tf.io.gfile to replace it')
  return GFiles(gfile)


# ------------------------------------------------------------------------------------------------
# The journaled replace.


def replace_paths(target: str) -> tuple[str, str]:
  """(journal, old copy) of a replace of `target`: hidden siblings named after it."""
  parent, name = os.path.split(os.fspath(target).rstrip('/'))
  return os.path.join(parent, f'.{name}.replace.json'), os.path.join(parent, f'.{name}.replace-old')


def _normal(target: str, files: LocalFiles) -> str:
  target = os.fspath(target)
  return os.path.abspath(target) if files.local else target.rstrip('/')


def _write_journal(files: LocalFiles, journal: str, staging: Optional[str], state: str) -> None:
  files.write_text(journal, json.dumps({
      'state': state,
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'staging': os.path.basename(staging) if staging else None,
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }, indent=2))


def _read_journal(files: LocalFiles, journal: str) -> dict[str, Any]:
  try:
    record = json.loads(files.read_text(journal))
  except Exception:  # pylint: disable=broad-except  (unreadable: gfile raises its own errors)
    return {}
  return record if isinstance(record, dict) else {}


def _live_writer(journal_path: str, journal: Mapping[str, Any]) -> Optional[str]:
  """Who may still be running the replace a journal records; None when it is certainly over."""
  if journal_path in _ACTIVE:
    return f'this process (pid {os.getpid()})'
  host, pid = journal.get('host'), journal.get('pid')
  if not isinstance(pid, int) or not host:
    return 'an unknown process (the journal is unreadable)'
  if host != socket.gethostname():
    return f'pid {pid} on host {host}'
  if pid == os.getpid():
    return None  # this process, which is not replacing it now: an earlier replace was cut short
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return None
  except OSError:
    pass
  return f'pid {pid} on this host'


def _commands(files: LocalFiles, target: str, old: str, journal: str,
              staging: Optional[str]) -> dict[str, str]:
  q = shlex.quote
  rm, mv, rmf = (('rm -rf', 'mv', 'rm -f') if files.local
                 else ('gsutil -m rm -r', 'gsutil -m mv', 'gsutil rm'))
  rm_staging = f' {q(staging)}' if staging and files.exists(staging) else ''
  journals = q(journal) + (f' {q(journal + ".tmp")}' if files.local else '')
  return {
      'keep_new': f'{rm} {q(old)}{rm_staging} && {rmf} {journals}',
      'keep_old': f'{rm} {q(target)}{rm_staging} && {mv} {q(old)} {q(target)} && {rmf} {journals}',
      'restore': f'{mv} {q(old)} {q(target)} && {rmf} {journals}',
      'forget': f'{rmf} {journals}' + (f' && {rm}{rm_staging}' if rm_staging else ''),
  }


def recover_replace(target: str, files: Optional[LocalFiles] = None,
                    strict: bool = False) -> Optional[str]:
  """Rolls back or finishes a replace of `target` that its writer did not finish.

  Cheap when there is nothing to do (two existence checks). See the module docstring for what is
  done in which case; a dead writer's staging folder named by the journal is deleted with it.

  Args:
    target: the directory a replace was (or may have been) putting in place.
    files: LocalFiles (default for local paths) or GFiles.
    strict: raise instead of returning 'pending' (writers: the deterministic names are taken).

  Returns:
    None (no unfinished replace), 'restored' (the target was missing: its old copy is back),
    'finished' (the new target was complete: the old copy and the journal are gone) or 'pending'
    (left as it was and reported in a warning with the commands that resolve it).

  Raises:
    InterruptedReplaceError: strict, and the outcome would be 'pending'.
  """
  files = files or files_for(target)
  target = _normal(target, files)
  journal_path, old = replace_paths(target)
  has_journal, has_old = files.exists(journal_path), files.exists(old)
  if not has_journal and not has_old:
    return None
  journal = _read_journal(files, journal_path) if has_journal else {}
  has_target = files.exists(target)
  staging = (os.path.join(os.path.dirname(target), journal['staging'])
             if isinstance(journal.get('staging'), str) else None)
  commands = _commands(files, target, old, journal_path, staging)
  writer = _live_writer(journal_path, journal) if has_journal else None
  outcome, problem = None, None
  if writer:
    problem = (f'{target} is being replaced by {writer} (journal {journal_path}), which may still '
               'be running')
    if has_old and not has_target:
      problem += (f'; the previous copy is at {old}. If that process is no longer running, put '
                  f"it back: {commands['restore']}")
    elif has_old:
      problem += (f"; if it is no longer running, keep {target} (the new copy, if complete): "
                  f"{commands['keep_new']}  or go back to the old copy: {commands['keep_old']}")
    else:
      problem += f"; if it is no longer running: {commands['forget']}"
  elif has_old and not has_target:
    outcome = 'restored'
  elif has_old and journal.get('state') == _REPLACED:
    outcome = 'finished'
  elif not has_old and has_target:
    outcome = 'finished'  # killed before the first rename, or after deleting the old copy
  elif has_old:
    problem = (f'a replace of {target} was interrupted after the old copy was moved aside to '
               f'{old}, and it is not known that the new {target} is complete. Keep the new copy: '
               f"{commands['keep_new']}  or go back to the old one: {commands['keep_old']}")
  else:
    problem = (f'a replace of {target} was interrupted (journal {journal_path}) and neither '
               f"{target} nor its old copy {old} exists; nothing to restore: {commands['forget']}")
  if outcome:
    try:
      if outcome == 'restored':
        files.move(old, target, into_place=True)
        files.sync_dir(os.path.dirname(target))
      elif has_old:
        files.rmtree(old)
      if staging and files.exists(staging):
        files.rmtree(staging)
      for path in (journal_path, journal_path + '.tmp'):  # .tmp: a journal write cut short
        if files.exists(path):
          files.remove(path)
      files.sync_dir(os.path.dirname(target))
    except Exception as e:  # pylint: disable=broad-except
      outcome, problem = None, (
          f'could not resolve an interrupted replace of {target} ({type(e).__name__}: {e}); '
          f"keep the new copy: {commands['keep_new']}  or go back to the old one: "
          f"{commands['keep_old'] if has_target else commands['restore']}")
  if outcome == 'restored':
    logger.warning('%s: a replace was interrupted after moving it aside; the previous copy is '
                   'back in place (renamed back from %s)', target, old)
    return outcome
  if outcome == 'finished':
    logger.warning('%s: finished a replace that was interrupted after the new copy was in place '
                   '(removed the leftover old copy and journal)', target)
    return outcome
  if strict:
    raise InterruptedReplaceError(problem)
  logger.warning('%s', problem)
  return 'pending'


@contextlib.contextmanager
def replacing(target: str, files: Optional[LocalFiles] = None,
              staging: Optional[str] = None) -> Iterator[None]:
  """Moves `target` out of the way for the body to put its new copy there, recoverably.

  First resolves an earlier unfinished replace (`recover_replace`). If `target` exists, a
  journal is written (naming `staging`, the folder the new copy comes from, if any) and `target`
  is renamed to `.NAME.replace-old`. When the body returns, the new `target` is taken as
  complete: the journal is marked 'replaced', the old copy deleted, the journal removed. When the
  body raises (KeyboardInterrupt too), whatever it left at `target` is deleted and the old copy
  renamed back. A process killed in between leaves the journal for the next `recover_replace`.

  Raises:
    InterruptedReplaceError: an earlier replace of `target` is unresolved or under way.
  """
  files = files or files_for(target)
  target = _normal(target, files)
  recover_replace(target, files, strict=True)
  journal, old = replace_paths(target)
  parent = os.path.dirname(target)
  _ACTIVE.add(journal)
  try:
    moved = False
    if files.exists(target):
      _write_journal(files, journal, staging, _ASIDE)
      try:
        files.move(target, old, into_place=False)
      except BaseException:
        if not files.exists(old):
          files.remove(journal)
        raise
      moved = True
    try:
      yield
    except BaseException:
      if moved:
        if files.exists(target):
          files.rmtree(target)
        files.move(old, target, into_place=True)
        files.sync_dir(parent)
        files.remove(journal)
        logger.warning('%s: the replace failed; the previous copy is back in place', target)
      raise
    files.sync_dir(parent)
    if moved:
      _write_journal(files, journal, staging, _REPLACED)
      files.rmtree(old)
      files.remove(journal)
      files.sync_dir(parent)
  finally:
    _ACTIVE.discard(journal)


def move_into_place(staging: str, target: str, files: Optional[LocalFiles] = None) -> None:
  """Renames the complete folder `staging` to `target`, replacing an existing `target` only once
  `staging` is in place (`replacing`: journaled, the old copy put back if the rename fails, and
  an interrupted replace rolled back or finished by the next call).

  On the local file system `staging` is fsynced (every file and folder) before the rename, and
  the parent folder after it. `staging` should be a sibling of `target` (same file system: each
  rename is atomic).

  Raises:
    InterruptedReplaceError: an earlier replace of `target` is unresolved or under way.
  """
  files = files or files_for(target)
  files.sync_tree(staging)
  with replacing(target, files, staging=staging):
    files.move(staging, target, into_place=True)


def _report_leftover_staging(parent: str, name: str) -> None:
  prefix = f'.{name}-new-'
  leftovers = sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix))
  if leftovers:
    logger.warning('%s: staging folders of earlier writes that did not finish (a killed process, '
                   'or one still writing): %s; if no other process is writing %s, delete them: '
                   'rm -rf %s', os.path.join(parent, name), ', '.join(leftovers), name,
                   ' '.join(shlex.quote(p) for p in leftovers))


# ------------------------------------------------------------------------------------------------
# Model directories.


def save_model_dir(directory: str, params: Any, record: dict[str, Any], record_name: str,
                   overwrite: bool = False,
                   extra_files: Optional[Mapping[str, bytes]] = None) -> str:
  """Writes `directory` (variables/ + record_name) atomically; returns its absolute path.

  `extra_files` ({file name: contents}) are written beside the record (e.g. a MuLan
  conditioner's text vocabulary). Everything is written into a staging folder beside it first
  (`write_directory_atomically`). An existing directory is only replaced with `overwrite`, and
  then only once the new one is complete: it is moved aside and put back if the replacement
  fails, and a replace killed half way is rolled back or finished by the next call, so a failure
  never loses what was there.
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

  An earlier replace of out_dir that was interrupted is rolled back or finished first
  (`recover_replace`). An existing out_dir is replaced only with overwrite, and only once the new
  one is complete and fsynced (`move_into_place`); a failed write leaves no trace. Staging
  folders left by writers that were killed are reported.

  Returns:
    The absolute out_dir.

  Raises:
    FileExistsError: out_dir exists and not overwrite (the message names `overwrite_hint`).
    InterruptedReplaceError: an earlier replace of out_dir is unresolved or under way (the
      message gives the commands that resolve it).
  """
  out_dir = os.path.abspath(out_dir)
  recover_replace(out_dir, strict=True)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass {overwrite_hint} to replace it')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  _report_leftover_staging(parent, os.path.basename(out_dir))
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


def read_model_record(directory: str, record_name: str, expected_format: str, what: str,
                      how_to_make: str) -> dict[str, Any]:
  """The JSON record of a saved model directory, its format checked.

  A replace of `directory` that was interrupted is rolled back or finished first
  (`recover_replace`; what cannot be resolved safely is reported in a warning).

  Args:
    directory: the saved directory.
    record_name: the record's file name, e.g. 'tokenizer.json'.
    expected_format: the record's 'format' tag.
    what: the kind of directory, for errors ('semantic tokenizer').
    how_to_make: named in the error when the directory holds no record.
  """
  recover_replace(directory)
  path = os.path.join(directory, record_name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: not a {what} directory ({how_to_make})')
  with open(path) as f:
    record = json.load(f)
  if record.get('format') != expected_format:
    raise ValueError(f'{path}: format {record.get("format")!r}, expected {expected_format!r}')
  return record
