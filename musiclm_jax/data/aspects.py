"""Safe parsers for the tag lists in caption files: Python-list strings and separated tags."""
from __future__ import annotations

import ast
from typing import Sequence

# Longer strings are refused before parsing: the longest MusicCaps aspect_list is under 1,000
# characters, and a bounded input keeps a hostile file from exhausting the parser.
MAX_LIST_CHARS = 100_000


class TagParseError(ValueError):
  """A tag list that is not what it should be (not a list of strings, or too long)."""


def parse_string_list(text: str) -> list[str]:
  """Parses a Python-list-of-strings literal such as MusicCaps' `aspect_list`, without eval.

  The text is parsed (never executed) into a syntax tree, and accepted only if that tree is one
  list or tuple whose elements are all plain string literals, so `__import__('os')...`, names,
  calls, numbers, nested lists and f-strings are all refused. Both quote styles and every
  Python escape are understood, as MusicCaps' lists were written by Python's `str(list)`.

  Args:
    text: e.g. `"['low quality', \"children's song\"]"`.

  Returns:
    the strings, stripped, empty ones dropped, in order (duplicates kept).

  Raises:
    TagParseError: anything else.
  """
  if not isinstance(text, str):
    raise TagParseError(f'expected a string, got {type(text).__name__}')
  if len(text) > MAX_LIST_CHARS:
    raise TagParseError(f'{len(text)} characters, at most {MAX_LIST_CHARS}')
  try:
    tree = ast.parse(text.strip(), mode='eval')
  except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
    # ValueError: NUL bytes; RecursionError/MemoryError: absurd nesting.
    raise TagParseError(f'not a list literal: {type(e).__name__}') from None
  body = tree.body
  if not isinstance(body, (ast.List, ast.Tuple)):
    raise TagParseError(f'not a list literal: a {type(body).__name__}')
  items = []
  for node in body.elts:
    # ast.Constant also covers numbers, bytes, None and bools: only str is a tag.
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
      raise TagParseError(f'list element is not a string literal: {type(node).__name__}')
    items.append(node.value.strip())
  return [item for item in items if item]


def split_tags(text: str, separators: Sequence[str] = (';', ',')) -> list[str]:
  """Splits a separated tag string (`'rock; live'`, `'/m/04rlf,/m/0342h'`).

  The first separator found in the text is the one used, so tags written with `;` may contain
  commas ('punchy, distorted; live'). Empty tags are dropped; a text starting with `[` is
  parsed as a list literal instead (parse_string_list).

  Args:
    text: the tag string; None or '' give no tags.
    separators: in order of preference.

  Returns:
    the stripped, non-empty tags in order.

  Raises:
    TagParseError: a `[...]` text that is not a list of strings.
  """
  if text is None:
    return []
  if not isinstance(text, str):
    raise TagParseError(f'expected a string, got {type(text).__name__}')
  text = text.strip()
  if text.startswith('['):
    return parse_string_list(text)
  for sep in separators:
    if sep in text:
      return [t.strip() for t in text.split(sep) if t.strip()]
  return [text] if text else []


def tags_from_value(value) -> list[str]:
  """Tags from a JSON value: a list of strings, or a separated string (split_tags).

  Raises:
    TagParseError: any other type, or a list with a non-string element.
  """
  if value is None:
    return []
  if isinstance(value, str):
    return split_tags(value)
  if isinstance(value, (list, tuple)):
    if not all(isinstance(v, str) for v in value):
      raise TagParseError('tag list has a non-string element')
    return [v.strip() for v in value if v.strip()]
  raise TagParseError(f'tags must be a list of strings or a string, got {type(value).__name__}')
