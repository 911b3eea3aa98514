"""Shared fixtures of the pipeline tests: one tiny pipeline folder per session, loaded once."""
from __future__ import annotations

import pytest


@pytest.fixture(scope='session')
def tiny_pipeline(tmp_path_factory):
  """(pipeline folder, {assemble_pipeline argument: part directory}) of random tiny parts.

  Built from shapes alone (tests/generate/tiny_pipeline.py): a few seconds, no compilation.
  """
  from tests.generate import tiny_pipeline as builder  # pylint: disable=g-import-not-at-top
  return builder.build_pipeline(str(tmp_path_factory.mktemp('tiny_pipeline')))


@pytest.fixture(scope='session')
def pipeline(tiny_pipeline):
  """The tiny pipeline, loaded (shared, so its jitted functions compile once per session)."""
  from musiclm_jax.generate.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  return Pipeline.load(tiny_pipeline[0])
