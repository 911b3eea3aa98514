"""musiclm_jax.common.atomic: a file is whole or absent, never half-written."""
from __future__ import annotations

import json
import os

import pytest

from musiclm_jax.common import atomic


def test_write_json_and_text_replace_whole_files(tmp_path):
  path = tmp_path / 'deep' / 'record.json'
  assert atomic.write_json(str(path), {'b': 1, 'a': [1, 2]}) == str(path)
  assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
  atomic.write_json(str(path), {'b': 2, 'a': 0}, indent=1, sort_keys=False, durable=True)
  assert json.loads(path.read_text()) == {'b': 2, 'a': 0}
  assert path.read_text().startswith('{\n "b": 2')
  atomic.write_text(str(tmp_path / 'notes.md'), 'é\n')
  assert (tmp_path / 'notes.md').read_text(encoding='utf-8') == 'é\n'
  assert sorted(os.listdir(path.parent)) == ['record.json']  # no temporary file left
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'config.gin'
  path.write_text('old\n')
  other = tmp_path / 'config.gin.tmp'  # another writer's file is not ours to touch
  other.write_text('theirs\n')

  def half_then_fail(tmp):
    with open(tmp, 'w') as f:
      f.write('ne')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    atomic.write_atomically(str(path), half_then_fail)
  assert path.read_text() == 'old\n'
  assert sorted(os.listdir(tmp_path)) == ['config.gin', 'config.gin.tmp']
  with pytest.raises(TypeError):
    atomic.write_json(str(path), {'not json': object()})
  assert path.read_text() == 'old\n' and other.read_text() == 'theirs\n'


def test_the_writer_sees_a_path_with_the_suffix(tmp_path):
  seen = []
  atomic.write_atomically(str(tmp_path / 'a.wav'), lambda tmp: (seen.append(tmp),
                                                               open(tmp, 'wb').close()),
                          suffix='.wav')
  assert seen[0].endswith('.wav') and os.path.dirname(seen[0]) == str(tmp_path)
  assert os.listdir(tmp_path) == ['a.wav']
