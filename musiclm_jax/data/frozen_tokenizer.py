"""A frozen Flax model (module + checkpoint + method) that turns audio batches into tokens."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import threading
from typing import Any, Mapping, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.data.integrity import IntegrityError, fingerprint

PyTree = Any

logger = logging.getLogger(__name__)

# musiclm_jax.train.checkpoints.Checkpointer: one directory per step, each with these items.
_STATE_ITEM = 'state'


def jsonable(value: Any) -> Any:
  """A JSON-able description of a config value that is stable across processes and runs.

  Functions and classes are named by module and qualified name, dataclasses (Flax modules
  included) by class and fields, dtypes by name; anything else by its class name, never by a
  repr that could hold a memory address.
  """
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  if isinstance(value, np.dtype):
    return value.name
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, np.ndarray):
    return {'ndarray_sha256': hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(),
            'shape': list(value.shape), 'dtype': value.dtype.name}
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return describe_config(value)
  if isinstance(value, functools.partial):
    return {'partial': jsonable(value.func), 'args': jsonable(list(value.args)),
            'kwargs': jsonable(dict(value.keywords))}
  dtype = getattr(value, 'dtype', None)
  if isinstance(dtype, np.dtype) and not hasattr(value, 'shape'):
    return dtype.name  # jnp.float32 and friends
  if callable(value) and hasattr(value, '__qualname__'):
    return f'{getattr(value, "__module__", "?")}.{value.__qualname__}'
  return f'<{type(value).__module__}.{type(value).__qualname__}>'


def describe_config(obj: Any) -> dict[str, Any]:
  """{'class': module.qualname, 'config': {field: value}} of a dataclass (e.g. a Linen module).

  Flax's bookkeeping fields (`parent`, `name`) are left out: they do not change the computation.
  """
  cls = type(obj)
  fields = {}
  if dataclasses.is_dataclass(obj):
    for f in dataclasses.fields(obj):
      if isinstance(obj, nn.Module) and f.name in ('parent', 'name'):
        continue
      fields[f.name] = jsonable(getattr(obj, f.name))
  return {'class': f'{cls.__module__}.{cls.__qualname__}', 'config': fields}


def _path_get(tree: Mapping[str, Any], path: str, where: str) -> Any:
  node = tree
  for part in [p for p in path.split('/') if p]:
    if not isinstance(node, Mapping) or part not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise KeyError(f'{where}: no entry {part!r} on the path {path!r} (found {have})')
    node = node[part]
  return node


def _path_set(tree: dict[str, Any], path: str, value: Any):
  parts = [p for p in path.split('/') if p]
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def _checkpoint_steps(directory) -> list[int]:
  """Finished steps of a Checkpointer directory (orbax renames a step into place when complete)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / _STATE_ITEM).is_dir())


def _restore_numpy(path, subtrees: Mapping[str, str]) -> dict[str, Any]:
  """Restores only the listed subtrees of an orbax PyTree checkpoint, as numpy arrays on the host.

  Args:
    path: the PyTree checkpoint directory.
    subtrees: {name in the result: '/'-separated path inside the saved tree}.

  Returns:
    {name: subtree of numpy arrays}.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def damaged(e: Optional[BaseException]) -> IntegrityError:
    detail = f' ({type(e).__name__}: {str(e)[:300]})' if e is not None else ''
    return IntegrityError(f'{path}: the weights cannot be read, the files are damaged or '
                          f'incomplete{detail}')

  checkpointer = ocp.PyTreeCheckpointer()
  try:
    try:
      metadata = checkpointer.metadata(path).item_metadata
    except (ValueError, OSError) as e:
      raise damaged(e) from e
    if metadata is None or getattr(metadata, 'tree', None) is None:
      raise damaged(None)
    saved = metadata.tree
    wanted: dict[str, Any] = {}
    for name, sub in subtrees.items():
      _path_set(wanted, sub, _path_get(saved, sub, f'checkpoint {path}'))
    # Restored as host numpy whatever mesh wrote it: a frozen tokenizer needs no shardings.
    item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          wanted)
    try:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    except (ValueError, OSError) as e:  # tensorstore reports damaged chunks as ValueError
      raise damaged(e) from e
  finally:
    checkpointer.close()
  return {name: _path_get(restored, sub, f'checkpoint {path}') for name, sub in subtrees.items()}


@gin.configurable
class FrozenTokenizer:
  """Any frozen Flax model that maps audio to tokens, loaded once per process and jitted.

  The same object serves the SeqIO preprocessor `tokenize_audio` (on the fly or inside a Beam
  worker) and the cache's provenance record: `provenance()` names the module, its config, the
  weights and a fingerprint of their values, so a cache made with other weights is detected.

  Weights come from (in this order):
  - a `musiclm_jax.train.checkpoints.Checkpointer` directory (MODEL_DIR/checkpoints, or the
    MODEL_DIR above it; numbered step directories whose 'state' item is a TrainState): the
    module's 'params' are `state.params[params_group]`, other variable collections come from
    `collections`;
  - a single orbax PyTree checkpoint directory holding the variables {'params': ...,
    <collection>: ...} or just the params tree;
  - `checkpoint_dir=None`: a random init from `init_seed` (random-projection tokenizers, and
    stand-ins until a trained model exists). The init runs on the CPU so that the values, and so
    the fingerprint, do not depend on the accelerator.

  Only orbax checkpoints are read (tensorstore arrays and JSON): nothing is unpickled.

  Args:
    model: the Flax Linen module (unbound), e.g. `@RandomProjectionQuantizer()` in gin.
    output_feature: the feature the tokens are written to, e.g. 'acoustic_tokens'.
    input_samples: the fixed number of samples per example the model is applied to.
    method: the module's method mapping audio float32 [batch, samples] to tokens int32
      [batch, frames] or [batch, frames, levels].
    checkpoint_dir: where the weights are (see above); None for a random init.
    step: the Checkpointer step to load; None loads the latest.
    params_group: the parameter group of a Checkpointer's TrainState ('/'-separated path inside
      `params`, e.g. 'generator' or 'generator/encoder').
    collections: other variable collections of a Checkpointer's state, {collection: path inside
      the state}, e.g. {'quantizer_state': 'model_state/quantizer_state'} for EMA codebooks.
    init_seed: seed of the random init when `checkpoint_dir` is None.
    expected_params_sha256: the `fingerprint` of {'params': ...} the weights must have (a frozen
      model folder's record); loading other weights is an `IntegrityError`. None: not checked.
    input_feature: the example feature holding the audio.
    batch_size: examples per model call (a short final batch is padded, so one compile).
    device: platform to run on ('cpu', 'gpu', 'tpu'); None takes JAX's default device.
  """

  def __init__(self, model: nn.Module = gin.REQUIRED, output_feature: str = gin.REQUIRED,
               input_samples: int = gin.REQUIRED, method: str = 'tokenize',
               checkpoint_dir: Optional[str] = None, step: Optional[int] = None,
               params_group: str = 'model', collections: Optional[Mapping[str, str]] = None,
               init_seed: int = 0, expected_params_sha256: Optional[str] = None,
               input_feature: str = 'audio', batch_size: int = 8,
               device: Optional[str] = None):
    self.model = model
    self.output_feature = output_feature
    self.input_samples = int(input_samples)
    self.method = method
    self.checkpoint_dir = checkpoint_dir
    self.step = step
    self.params_group = params_group
    self.collections = dict(collections or {})
    self.init_seed = int(init_seed)
    self.expected_params_sha256 = expected_params_sha256
    self.input_feature = input_feature
    self.batch_size = int(batch_size)
    self.device = device
    self._lock = threading.Lock()
    self._loaded: Optional[dict[str, Any]] = None

  def __repr__(self):
    weights = self.checkpoint_dir or f'random init seed {self.init_seed}'
    return (f'FrozenTokenizer({type(self.model).__name__}.{self.method}, {weights}, '
            f'{self.input_feature} -> {self.output_feature})')

  # Beam and tf.data may pickle the tokenizer (e.g. inside a preprocessor); the loaded weights and
  # compiled function stay behind and are loaded again, once, in the receiving process.
  def __getstate__(self):
    state = dict(self.__dict__)
    state['_lock'] = None
    state['_loaded'] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def _device(self) -> jax.Device:
    return jax.local_devices(backend=self.device)[0]

  def output_spec(self) -> jax.ShapeDtypeStruct:
    """Shape (without the batch axis) and dtype of one example's tokens; loads nothing."""
    x = jax.ShapeDtypeStruct((1, self.input_samples), jnp.float32)
    out, _ = jax.eval_shape(
        lambda a: self.model.init_with_output(jax.random.PRNGKey(0), a, method=self.method), x)
    if not jnp.issubdtype(out.dtype, jnp.integer):
      raise TypeError(f'{self!r}: {type(self.model).__name__}.{self.method} returns '
                      f'{out.dtype}, expected integer tokens')
    return jax.ShapeDtypeStruct(tuple(out.shape[1:]), jnp.dtype(jnp.int32))

  def _weights_source(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """(host numpy variables, JSON description of where they came from)."""
    if self.checkpoint_dir is None:
      with jax.default_device(jax.local_devices(backend='cpu')[0]):
        variables = self.model.init(jax.random.PRNGKey(self.init_seed),
                                    jnp.zeros((1, self.input_samples), jnp.float32),
                                    method=self.method)
      variables = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables))
      return variables, {'source': 'random_init', 'init_seed': self.init_seed}
    from etils import epath  # pylint: disable=g-import-not-at-top
    directory = epath.Path(self.checkpoint_dir)
    steps = _checkpoint_steps(directory)
    if not steps and _checkpoint_steps(directory / 'checkpoints'):  # a run's MODEL_DIR
      directory = directory / 'checkpoints'
      steps = _checkpoint_steps(directory)
    if steps:
      step = steps[-1] if self.step is None else int(self.step)
      if step not in steps:
        raise FileNotFoundError(f'{self!r}: no step {step} in {directory} (found {steps})')
      subtrees = {'params': f'params/{self.params_group}', **self.collections}
      variables = _restore_numpy(directory / str(step) / _STATE_ITEM, subtrees)
      return variables, {'source': 'checkpoint', 'layout': 'trainer', 'path': str(directory),
                         'step': step, 'params_group': self.params_group,
                         'collections': dict(sorted(self.collections.items()))}
    if not (directory / '_METADATA').exists():
      raise FileNotFoundError(
          f'{self!r}: {directory} is neither a Checkpointer directory (numbered steps with a '
          f"'{_STATE_ITEM}' item) nor an orbax PyTree checkpoint")
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.PyTreeCheckpointer() as checkpointer:
      top = checkpointer.metadata(directory).item_metadata.tree
    variables = _restore_numpy(directory, {name: name for name in top})
    if 'params' not in top:  # the params tree alone
      variables = {'params': variables}
    return variables, {'source': 'checkpoint', 'layout': 'pytree', 'path': str(directory)}

  def _load_host(self) -> dict[str, Any]:
    """Reads the weights into host memory and fingerprints them, once per process."""
    if self._loaded is not None:
      return self._loaded
    with self._lock:
      if self._loaded is None:
        host_variables, source = self._weights_source()
        logger.info('%r: weights loaded (%s)', self, source)
        digest = fingerprint(host_variables)
        if self.expected_params_sha256 is not None:
          params_digest = (digest if set(host_variables) == {'params'} else
                           fingerprint({'params': host_variables.get('params')}))
          if params_digest != self.expected_params_sha256:
            raise IntegrityError(
                f'{self!r}: the weights are not the ones their record was saved with '
                f'(params_sha256 {params_digest[:12]}..., recorded '
                f'{self.expected_params_sha256[:12]}...): the files were changed or damaged')
        self._loaded = {'host_variables': host_variables, 'source': source,
                        'fingerprint': digest}
    return self._loaded

  def _load(self) -> dict[str, Any]:
    """The host weights plus their copy on the device and the jitted call, once per process.

    Kept apart from `_load_host` so that checking a cache's provenance (in a training process)
    takes no accelerator memory.
    """
    loaded = self._load_host()
    if 'apply' in loaded:
      return loaded
    with self._lock:
      if 'apply' not in loaded:
        device = self._device
        loaded['variables'] = jax.device_put(loaded['host_variables'], device)
        loaded['apply'] = jax.jit(functools.partial(self.model.apply, method=self.method))
        logger.info('%r: running on %s', self, device)
    return loaded

  def variables(self) -> dict[str, Any]:
    """The model's variables as host numpy arrays (loads them on first use)."""
    return self._load_host()['host_variables']

  def __call__(self, audio: np.ndarray) -> np.ndarray:
    """Tokens int32 [batch, ...] of audio float32 [batch, input_samples] (a numpy function)."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2 or audio.shape[1] != self.input_samples:
      raise ValueError(f'{self!r}: expected audio [batch, {self.input_samples}], got '
                       f'{audio.shape}')
    loaded = self._load()
    outputs = []
    for start in range(0, audio.shape[0], self.batch_size):
      chunk = audio[start:start + self.batch_size]
      n = chunk.shape[0]
      if n < self.batch_size:  # one compiled shape for every batch
        chunk = np.concatenate(
            [chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], np.float32)])
      tokens = loaded['apply'](loaded['variables'], jax.device_put(chunk, self._device))
      outputs.append(np.asarray(tokens)[:n].astype(np.int32))
    if not outputs:
      return np.zeros((0,) + self.output_spec().shape, np.int32)
    return np.concatenate(outputs)

  def provenance(self) -> dict[str, Any]:
    """What produces the tokens, as JSON: module and config, method, weights, their fingerprint.

    Two tokenizers with equal provenance (ignoring the informative `weights.path` and
    `weights.step`) produce the same tokens from the same audio.
    """
    loaded = self._load_host()
    spec = self.output_spec()
    return {
        'tokenizer': f'{type(self).__module__}.{type(self).__qualname__}',
        'model': describe_config(self.model),
        'method': self.method,
        'input_feature': self.input_feature,
        'input_samples': self.input_samples,
        'output_feature': self.output_feature,
        'output': {'shape': list(spec.shape), 'dtype': spec.dtype.name},
        'weights': loaded['source'],
        'params_sha256': loaded['fingerprint'],
    }
