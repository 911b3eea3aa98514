"""A tiny pipeline folder built from randomly initialised parts (no training, no runs/).

Every part has the real structure at toy size: a SoundStream of 4 levels x 32 codes (levels 1-2
coarse, 3-4 fine), a w2v-BERT + k-means semantic tokenizer of 16 codes, a MuLan conditioner of
2 levels x 8 codes, a melody conditioner of 2 levels x 4 codes (1 s windows, 0.5 s hop, 3
windows per semantic window), and three 1-layer stage LMs (windows: semantic 2 s, coarse 1 s,
fine 0.5 s; the MuLan-conditioned ones recorded as trained with conditioning dropout, so the
pipeline samples them with guidance). Parameters are drawn in numpy from the networks' shapes
(`random_variables`), so building it compiles nothing. The audio they make is noise; what the
tests check is the plumbing: shapes, prompt layouts, windows, joins, boundaries, errors.

  python -m tests.generate.tiny_pipeline /tmp/tiny_pipeline   # a folder to try the CLI on
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIZES = dict(semantic_codes=16, codec_levels=4, codec_codes=32, coarse_levels=2,
             mulan_levels=2, mulan_codes=8, melody_levels=2, melody_codes=4, melody_frames=3)
CROP_SECONDS = {'semantic': 2.0, 'coarse': 1.0, 'fine': 0.5}
MULAN_WINDOW = 4800
MULAN_HOP = 2400


def random_variables(module, *args, seed: int = 0, method=None, **kwargs):
  """Variables of `module.init(*args)` drawn in numpy from their shapes: nothing is compiled.

  Kernels and tables are normal with std 1/sqrt(fan-in), LayerNorm scales 1, biases, EMA
  statistics and flags 0: a random initialisation like Flax's, without the seconds of XLA
  compilation a real `init` of each network costs on a shared 2-core machine.
  """
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *args, method=method, **kwargs)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    dtype = np.dtype(leaf.dtype)
    if not np.issubdtype(dtype, np.floating):
      return np.zeros(leaf.shape, dtype)
    if name.endswith('scale'):
      return np.ones(leaf.shape, dtype)
    if name.endswith('bias') or name.startswith('ema_'):
      return np.zeros(leaf.shape, dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def codec():
  from musiclm_jax.codec.soundstream import SoundStream  # pylint: disable=g-import-not-at-top
  model = SoundStream(channels=4, channel_mults=(1, 2, 2, 4), embedding_dim=16,
                      num_levels=SIZES['codec_levels'], codebook_size=SIZES['codec_codes'],
                      kmeans_init=False)
  return model, random_variables(model, jnp.zeros((1, 480), jnp.float32), train=False, seed=1)


def semantic_tokenizer():
  from musiclm_jax.audio.features import LogMelFrontEnd  # pylint: disable=g-import-not-at-top
  from musiclm_jax.semantic.tokenizer import SemanticTokenizer  # pylint: disable=g-import-not-at-top
  from musiclm_jax.semantic.w2v_bert import W2VBert  # pylint: disable=g-import-not-at-top
  encoder = W2VBert(front_end=LogMelFrontEnd(n_mels=16), conv_channels=4, embed_dim=32,
                    num_heads=2, head_dim=16, mlp_dim=64, num_contrastive_layers=1,
                    num_mlm_layers=1, codebook_size=16, codebook_dim=8, projection_dim=8)
  tokenizer = SemanticTokenizer(encoder=encoder, layer=1,
                                num_clusters=SIZES['semantic_codes'])
  params = random_variables(tokenizer, jnp.zeros((1, 960), jnp.float32), method='tokenize',
                            seed=2)['params']
  params['centroids'] = np.random.default_rng(3).standard_normal(
      params['centroids'].shape).astype(np.float32)
  return tokenizer, params


def _codebooks(levels: int, codes: int, dim: int, seed: int) -> np.ndarray:
  """Residual codebooks for unit vectors: level l at scale 0.5 ** l."""
  rng = np.random.default_rng(seed)
  books = rng.standard_normal((levels, codes, dim)) / np.sqrt(dim)
  return (books * 0.5 ** np.arange(levels)[:, None, None]).astype(np.float32)


def mulan_conditioner():
  from musiclm_jax.audio.features import LogMelFrontEnd  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan import conditioning  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.audio import ResNetAudioTower  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.model import MuLan  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.text import BertEncoder  # pylint: disable=g-import-not-at-top
  network = MuLan(audio_tower=ResNetAudioTower.tiny(front_end=LogMelFrontEnd(n_mels=16),
                                                    stage_widths=(8, 16), num_groups=2),
                  text_tower=BertEncoder(hidden=16, layers=1, heads=2, mlp=32, max_positions=32,
                                         pooler=False),
                  embed_dim=8)
  params = random_variables(network, jnp.zeros((1, MULAN_WINDOW)), jnp.zeros((1, 8), jnp.int32),
                            jnp.ones((1, 8), jnp.int32), seed=4)['params']
  return conditioning.MuLanConditioner(
      network, params, _codebooks(SIZES['mulan_levels'], SIZES['mulan_codes'], 8, seed=5),
      MULAN_WINDOW, MULAN_HOP, text_length=16)


def melody_conditioner():
  from musiclm_jax.melody import conditioning  # pylint: disable=g-import-not-at-top
  from musiclm_jax.melody.encoder import MELODY_FRONT_END, MelodyEncoder  # pylint: disable=g-import-not-at-top
  encoder = MelodyEncoder(front_end=dataclasses.replace(MELODY_FRONT_END, n_mels=16),
                          window_seconds=1.0, hop_seconds=0.5, patch_time=8, embed_dim=16,
                          num_layers=1, num_heads=2, head_dim=8, mlp_dim=32, output_dim=8)
  params = random_variables(encoder, jnp.zeros((1, encoder.window_samples)), seed=6)['params']
  return conditioning.MelodyConditioner(
      encoder, params, _codebooks(SIZES['melody_levels'], SIZES['melody_codes'], 8, seed=7))


def stages(conditioning_dropout: float = 0.1):
  """{stage: (StageModel, Decoder params)} with the tiny sizes."""
  from musiclm_jax.nn.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.model import StageModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.spec import TokenSizes, stage_specs  # pylint: disable=g-import-not-at-top
  config = TransformerConfig(vocab_size=0, embed_dim=32, num_layers=1, num_heads=2, head_dim=16,
                             mlp_dim=64, relative_num_buckets=16, relative_max_distance=64)
  out = {}
  for i, (name, spec) in enumerate(stage_specs(TokenSizes(**SIZES)).items()):
    model = StageModel(spec, config, vocab_multiple=8,
                       conditioning_dropout=conditioning_dropout if spec.droppable else 0.0)
    params = random_variables(model.module, jnp.zeros((1, 8), jnp.int32), seed=10 + i)
    out[name] = (model, params['params'])
  return out


def build_parts(root: str) -> dict[str, str]:
  """Writes every part as an exported directory under `root`; returns {argument: directory}."""
  from musiclm_jax.generate import export  # pylint: disable=g-import-not-at-top
  from musiclm_jax.melody.conditioning import save_melody_conditioner  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.conditioning import save_conditioner  # pylint: disable=g-import-not-at-top
  from musiclm_jax.semantic.tokenizer import save_tokenizer  # pylint: disable=g-import-not-at-top
  dirs = {}
  model, variables = codec()
  dirs['codec_dir'] = export.save_codec(os.path.join(root, 'codec'), model, variables)
  tokenizer, params = semantic_tokenizer()
  dirs['semantic_tokenizer_dir'] = save_tokenizer(os.path.join(root, 'semantic_tokenizer'),
                                                  tokenizer, params, {'note': 'random init'})
  dirs['mulan_conditioner_dir'] = save_conditioner(os.path.join(root, 'mulan_conditioner'),
                                                   mulan_conditioner())
  dirs['melody_conditioner_dir'] = save_melody_conditioner(
      os.path.join(root, 'melody_conditioner'), melody_conditioner())
  for name, (model, params) in stages().items():
    dirs[f'{name}_stage_dir'] = export.save_stage(
        os.path.join(root, f'{name}_stage'), model, params, crop_seconds=CROP_SECONDS[name])
  return dirs


def build_pipeline(root: str) -> tuple[str, dict[str, str]]:
  """(pipeline folder, the part directories it was assembled from) under `root`."""
  from musiclm_jax.generate.pipeline import assemble_pipeline  # pylint: disable=g-import-not-at-top
  parts = build_parts(os.path.join(root, 'parts'))
  folder = assemble_pipeline(os.path.join(root, 'pipeline'), **parts)
  return folder, parts


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  print(build_pipeline(sys.argv[1])[0])
