"""The conformer stack scanned over stacked layers equals the unrolled one, in every use."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.semantic import tokenizer as tokenizer_lib
from musiclm_jax.semantic import w2v_bert
from musiclm_jax.semantic.conformer import ConformerConfig
from musiclm_jax.semantic.conformer import ConformerStack
from musiclm_jax.semantic.conformer import stack_layer_params
from musiclm_jax.semantic.conformer import unstack_layer_params

CONFIG = ConformerConfig(embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                         relative_num_buckets=8, relative_max_distance=16)
FRAMES = 4
SAMPLES = 960 * FRAMES
TINY = dict(front_end=LogMelFrontEnd(n_mels=16), conv_channels=4, embed_dim=16, num_heads=2,
            head_dim=8, mlp_dim=32, num_contrastive_layers=1, num_mlm_layers=2,
            codebook_size=16, codebook_dim=8, projection_dim=8)


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), nn.meta.unbox(tree))


def _scanned_stack(num_layers, remat_policy='none'):
  return ConformerStack(dataclasses.replace(CONFIG, scan_layers=True,
                                            remat_policy=remat_policy), num_layers)


@pytest.fixture(scope='module')
def unscanned():
  """A 3-block unscanned stack, its params, an input and its per-layer outputs."""
  stack = ConformerStack(CONFIG, 3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 16))
  params = nn.meta.unbox(jax.jit(stack.init)(jax.random.PRNGKey(0), x))['params']
  return stack, params, x, jax.jit(stack.apply)({'params': params}, x)


@pytest.mark.parametrize('remat_policy', ['none', 'full'])
def test_scanned_stack_equals_the_unrolled_one_layer_by_layer(unscanned, remat_policy):
  _, params, x, want = unscanned
  scanned = _scanned_stack(3, remat_policy)
  variables = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), x)
  stacked = stack_layer_params(params, 3)
  # The scanned layout: the unrolled blocks' params along a leading 'layers' axis.
  assert _shapes(variables['params']) == _shapes(stacked)
  assert tuple(nn.get_partition_spec(variables)['params']['layers']['ff_in']['wi']['kernel']) == (
      'layers', 'embed', 'mlp')
  got = jax.jit(scanned.apply)({'params': stacked}, x)
  assert len(got) == 3
  for i, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f'layer {i + 1}')
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, unstack_layer_params(stacked), params))


def test_scanned_num_layers_to_run_scans_a_slice(unscanned):
  _, params, x, want = unscanned
  scanned = _scanned_stack(3)
  stacked = stack_layer_params(params, 3)
  run = jax.jit(scanned.apply, static_argnames='num_layers_to_run')
  got = run({'params': stacked}, x, num_layers_to_run=2)
  assert len(got) == 2
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(lambda p: scanned.apply({'params': p}, x, num_layers_to_run=2))(stacked)
  assert [e.params['length'] for e in jaxpr.eqns if e.primitive.name == 'scan'] == [2]
  assert run({'params': stacked}, x, num_layers_to_run=0) == []
  # init creates the whole stack whatever it runs: every init path gives one tree.
  partial = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x, num_layers_to_run=1))
  assert _shapes(partial['params']) == _shapes(stacked)
  with pytest.raises(ValueError, match='num_layers_to_run=4'):
    jax.eval_shape(lambda: scanned.apply({'params': stacked}, x, num_layers_to_run=4))


def _stack_network_params(params, net):
  return {**params, 'contrastive': stack_layer_params(params['contrastive'],
                                                      net.num_contrastive_layers),
          'mlm': stack_layer_params(params['mlm'], net.num_mlm_layers)}


@pytest.fixture(scope='module')
def networks():
  """(unscanned W2VBert, its params, scanned W2VBert, the same params stacked)."""
  net = w2v_bert.W2VBert(**TINY)
  params = nn.meta.unbox(net.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, SAMPLES)),
                                  jnp.zeros((1, FRAMES), bool)))['params']
  scanned = w2v_bert.W2VBert(**TINY, scan_layers=True)
  return net, params, scanned, _stack_network_params(params, net)


def test_tokenizer_of_a_scanned_encoder_keeps_the_stacked_modules_whole(networks):
  net, params, scanned, stacked = networks
  audio = jnp.asarray(np.random.default_rng(0).standard_normal((2, SAMPLES)), jnp.float32)
  full = jax.eval_shape(lambda: scanned.init({'params': jax.random.PRNGKey(0)},
                                             jnp.zeros((1, SAMPLES)),
                                             jnp.zeros((1, FRAMES), bool)))['params']
  assert _shapes(full) == _shapes(stacked)
  centroids = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
  # Layer 2 = the first masked-prediction layer: both modules run, the second one partly.
  tok = tokenizer_lib.SemanticTokenizer(encoder=scanned, layer=2, num_clusters=4)
  variables = tokenizer_lib.tokenizer_params(tok, stacked, centroids)
  for module in ('contrastive', 'mlm'):
    assert _shapes(variables['encoder'][module]) == _shapes(full[module])
  assert 'mlm_head' not in variables['encoder']
  # The scanned tokenizer embeds as the unscanned encoder does (and scans one mlm block only).
  np.testing.assert_allclose(tok.apply({'params': variables}, audio, method='embed'),
                             net.apply({'params': params}, audio, 2, method='embed'),
                             rtol=1e-4, atol=1e-4)
  # tokenizer.json records the layout.
  config = tokenizer_lib.encoder_config(scanned)
  assert config['scan_layers'] is True
  assert tokenizer_lib.encoder_config(tokenizer_lib.encoder_from_config(config)) == config


def test_scanned_w2v_bert_gradients_equal_the_unrolled_ones(networks):
  net, params, scanned, stacked = networks
  audio = jnp.asarray(np.random.default_rng(2).standard_normal((2, SAMPLES)) * 0.3, jnp.float32)
  mask = jnp.asarray(np.arange(2 * FRAMES).reshape(2, FRAMES) % 3 == 0)

  def loss(p, network):
    out = network.apply({'params': p}, audio, mask)
    return sum(jnp.mean(jnp.square(out[k])) for k in ('context', 'targets', 'mlm_logits'))

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  want_loss, want = value_and_grad(params, net)
  # Remat composes with the scan as in the stage decoders.
  got_loss, got = value_and_grad(stacked, scanned.clone(remat_policy='full'))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  want = _stack_network_params(want, net)
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = want
    for k in path:
      b = b[k.key]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  per_layer = np.abs(np.asarray(got['mlm']['layers']['ff_in']['wi']['kernel'])).reshape(2, -1)
  assert np.all(per_layer.max(axis=1) > 0)
