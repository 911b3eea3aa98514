"""musicnn's original TensorFlow graph, run by TensorFlow: the reference for the JAX port.

The musicnn package ships, beside each checkpoint, the MetaGraphDef its authors saved at training
time (TF 1.12): the very graph that musicnn/models.py builds, with tf.layers' batch norm as
FusedBatchNorm and tf.cond on the is_training placeholder. musicnn's Python code cannot rebuild
it under TF 2.21 (tf.compat.v1.layers needs Keras 2), but the saved graph imports and runs:
this helper keeps its inference part (the training ops' shape annotations no longer validate),
feeds the checkpoint's variables into their `read` tensors, sets is_training=False as
musicnn's extractor does, and runs it in a tf.compat.v1.Session on a private graph, which
leaves the process in eager mode.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from typing import Sequence

import numpy as np

from musiclm_jax.evaluation import musicnn

# The graph's tensors of musicnn's extractor outputs (names in the saved MetaGraphDef).
OUTPUT_TENSORS = {
    'tags': 'model/Sigmoid:0',
    'logits': 'model/dense_1/BiasAdd:0',
    'penultimate': 'model/batch_normalization_10/batchnorm/add_1:0',
    'max_pool': 'model/Max:0',             # [batch, 753, 1]: musicnn squeezes it
    'mean_pool': 'model/moments/Squeeze:0',
}
INPUT_TENSOR = 'model/Placeholder:0'          # [batch, 187, 96] log-mel patches
IS_TRAINING_TENSOR = 'model/Placeholder_2:0'


class OriginalGraph:
  """A musicnn model's saved TF graph with its checkpoint, ready to run on patches."""

  def __init__(self, model: str = 'MTT_musicnn'):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.core.protobuf import meta_graph_pb2  # pylint: disable=g-import-not-at-top
    prefix = musicnn.checkpoint_prefix(model)
    meta = meta_graph_pb2.MetaGraphDef()
    with open(prefix + '.meta', 'rb') as f:
      meta.ParseFromString(f.read())
    outputs = [name.split(':')[0] for name in OUTPUT_TENSORS.values()]
    graph_def = tf.compat.v1.graph_util.extract_sub_graph(meta.graph_def, outputs)
    for node in graph_def.node:
      node.attr.pop('_output_shapes', None)
    self.graph = tf.Graph()
    with self.graph.as_default():
      tf.compat.v1.import_graph_def(graph_def, name='')
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    self.variable_feeds = {
        self.graph.get_tensor_by_name(node.name + '/read:0'): reader.get_tensor(node.name)
        for node in graph_def.node if node.op == 'VariableV2'}
    self.session = tf.compat.v1.Session(graph=self.graph)

  def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
    """The original graph's outputs on [batch, 187, 96] patches (is_training=False)."""
    feeds = dict(self.variable_feeds)
    feeds[self.graph.get_tensor_by_name(INPUT_TENSOR)] = np.asarray(patches, np.float32)
    feeds[self.graph.get_tensor_by_name(IS_TRAINING_TENSOR)] = False
    names = list(OUTPUT_TENSORS)
    values = self.session.run([OUTPUT_TENSORS[n] for n in names], feeds)
    out = dict(zip(names, values))
    out['max_pool'] = out['max_pool'][..., 0]
    out['mean_pool'] = out['mean_pool'][..., 0]
    return out

  def close(self):
    self.session.close()


def original_batch_data(wav_paths: Sequence[str]) -> list[np.ndarray]:
  """musicnn.extractor.batch_data(path, 187, 187)'s patches of each file, in a subprocess.

  The package's own preprocessing (librosa.load at 16 kHz, mel spectrogram, float16 log). It runs
  in a child process because importing musicnn.extractor disables TF's eager mode for the whole
  process.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out_paths = [os.path.join(tmp, f'{i}.npy') for i in range(len(wav_paths))]
    code = textwrap.dedent(f"""
        import numpy as np
        from musicnn import extractor
        for wav_path, out_path in zip({list(wav_paths)!r}, {out_paths!r}):
          batch, _ = extractor.batch_data(wav_path, {musicnn.PATCH_FRAMES},
                                          {musicnn.PATCH_FRAMES})
          np.save(out_path, np.asarray(batch), allow_pickle=False)
        """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
    env.pop('XLA_FLAGS', None)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, check=False,
                            env=env)
    if result.returncode:
      raise RuntimeError('musicnn.extractor.batch_data failed:\n'
                         f'{result.stderr.decode()[-3000:]}')
    return [np.load(path, allow_pickle=False) for path in out_paths]
