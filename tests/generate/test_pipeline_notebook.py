"""notebooks/sample.ipynb runs end to end (nbclient, a fresh kernel) against the tiny pipeline."""
from __future__ import annotations

import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'sample.ipynb')


def test_the_sampling_notebook_runs_end_to_end(tiny_pipeline, monkeypatch):
  folder, _ = tiny_pipeline
  # The kernel inherits the environment: the parameter cell reads these.
  monkeypatch.setenv('MUSICLM_JAX_CHECKPOINT', folder)
  monkeypatch.setenv('MUSICLM_JAX_SECONDS', '2')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells)
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                                   resources={'metadata': {'path': REPO}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  errors = [o for o in outputs if o.output_type == 'error']
  assert not errors, errors
  html = ''.join(o.get('data', {}).get('text/html', '') for o in outputs
                 if o.output_type == 'display_data')
  assert html.count('<audio') == 3  # the text sample, the hum, the melody sample
  assert any('image/png' in o.get('data', {}) for o in outputs)  # the spectrograms
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert f'pipeline {folder}' in text and 'melody conditioning: yes' in text


def test_the_notebook_defaults_to_the_shipped_pipeline(monkeypatch):
  """A fresh user (no MUSICLM_JAX_* variables) gets the pipeline shipped in the package."""
  monkeypatch.delenv('MUSICLM_JAX_CHECKPOINT', raising=False)
  monkeypatch.delenv('MUSICLM_JAX_SECONDS', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
  namespace = {}
  exec(compile(cell.source, 'parameters cell', 'exec'), namespace)  # our own notebook's cell
  shipped = os.path.join(REPO, 'musiclm_jax', 'pretrained', 'tiny')
  assert os.path.realpath(namespace['CHECKPOINT']) == os.path.realpath(shipped)
  assert os.path.isfile(os.path.join(namespace['CHECKPOINT'], 'manifest.json'))
  assert namespace['SECONDS'] == 10.0
