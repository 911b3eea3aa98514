"""Device mesh, logical-axis rules and the partitioner that jits and compiles sharded functions."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')

LogicalRules = Sequence[tuple[str, Any]]


@gin.configurable
def standard_logical_axis_rules(
    additional_rules: Optional[LogicalRules] = None) -> tuple[tuple[str, Any], ...]:
  """The one ordered map from logical axis names (model code) to mesh axes (data, fsdp, model).

  Rules are tried in order; a mesh axis already taken by an earlier dimension of the same array
  is skipped, so `embed` is sharded over `fsdp` for parameters (FSDP) but stays whole in
  activations, whose `batch` already uses `fsdp`. `model` is tensor parallelism: heads, MLP
  hidden units, vocabulary and convolution output channels.

  Args:
    additional_rules: extra (name, mesh axes) pairs placed before the standard ones, so they win
      (e.g. `[('length', 'model')]` for sequence parallelism).

  Returns:
    A tuple of (logical name, mesh axis or tuple of mesh axes or None).
  """
  rules = (
      # Activations.
      ('batch', ('data', 'fsdp')),
      ('length', None),
      # Parameters and activations alike.
      ('vocab', 'model'),
      ('mlp', 'model'),
      ('heads', 'model'),
      ('kv', None),
      ('embed', 'fsdp'),
      ('norm', None),
      ('relpos_buckets', None),
      ('layers', None),
      # Convolutions (codec, conformer front ends).
      ('conv_out', 'model'),
      ('conv_in', 'fsdp'),
      ('conv_width', None),
      ('conv_height', None),
      # Quantizers.
      ('codebook_levels', None),
      ('codebook', None),
  )
  return tuple(tuple(r) for r in (additional_rules or ())) + rules


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 in `mesh_shape` by what is left of `num_devices`."""
  mesh_shape = tuple(int(d) for d in mesh_shape)
  if len(mesh_shape) != len(MESH_AXES):
    raise ValueError(f'MESH_SHAPE must have {len(MESH_AXES)} entries {MESH_AXES}, got {mesh_shape}')
  if mesh_shape.count(-1) > 1:
    raise ValueError(f'MESH_SHAPE may hold at most one -1, got {mesh_shape}')
  if any(d == 0 or d < -1 for d in mesh_shape):
    raise ValueError(f'MESH_SHAPE entries must be positive or -1, got {mesh_shape}')
  if -1 in mesh_shape:
    known = math.prod(d for d in mesh_shape if d != -1)
    if num_devices % known:
      raise ValueError(f'MESH_SHAPE {mesh_shape}: {num_devices} devices do not divide by {known}')
    mesh_shape = tuple(num_devices // known if d == -1 else d for d in mesh_shape)
  if math.prod(mesh_shape) > num_devices:
    raise ValueError(f'MESH_SHAPE {mesh_shape} needs {math.prod(mesh_shape)} devices, '
                     f'only {num_devices} exist (XLA_FLAGS=--xla_force_host_platform_device_count '
                     'simulates more on CPU)')
  return mesh_shape


@gin.configurable
def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1),
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """Builds a (data, fsdp, model) mesh over all processes' devices.

  Args:
    mesh_shape: sizes of the data, fsdp and model axes; one may be -1 for "the rest".
    devices: defaults to `jax.devices()` (every process's). A shape using fewer devices than
      exist takes the first ones (useful for single-device reference runs).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  used = devices[:math.prod(shape)]
  if len(used) < len(devices):
    logging.warning('Mesh %s uses %d of %d devices.', shape, len(used), len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=used,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


class UnmappedLogicalAxisError(ValueError):
  """A parameter or state entry uses a logical axis name the rules do not cover."""


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def logical_to_mesh_specs(logical_specs: Any, rules: LogicalRules) -> Any:
  """Maps a tree of logical PartitionSpecs to mesh PartitionSpecs, failing on unknown names.

  Flax silently replicates a dimension whose logical name no rule mentions; at pod scale that
  is a silent out-of-memory, so here it raises with the path of the culprit.
  """
  known = {name for name, _ in rules}

  def convert(path, spec):
    if spec is None:
      return P()
    unknown = [n for n in spec if isinstance(n, str) and n not in known]
    if unknown:
      raise UnmappedLogicalAxisError(
          f'{_path_str(path)}: logical axes {unknown} (of {tuple(spec)}) are not mapped by the '
          f'logical_axis_rules; add them to standard_logical_axis_rules(additional_rules=...).')
    return nn.logical_to_mesh_axes(tuple(spec), rules)

  return jax.tree_util.tree_map_with_path(
      convert, logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)


@dataclasses.dataclass(frozen=True)
class CompiledFunction:
  """An AOT-compiled function with the numbers the compiler knows about it."""
  compiled: Any
  memory: Any  # compiled.memory_analysis(): argument/output/temp/generated code bytes per device
  cost: Any

  def __call__(self, *args):
    return self.compiled(*args)

  def memory_summary(self) -> dict[str, int]:
    m = self.memory
    if m is None:
      return {}
    names = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
             'alias_size_in_bytes', 'generated_code_size_in_bytes')
    return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}


@gin.configurable
class Partitioner:
  """Owns the mesh and the logical-axis rules; jits, shards and compiles functions on them.

  Every function is traced inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, so
  Flax's logical sharding constraints in model code resolve against this mesh.
  """

  def __init__(self, mesh_shape: Sequence[int] = (-1, 1, 1),
               logical_axis_rules: Optional[LogicalRules] = None,
               devices: Optional[Sequence[jax.Device]] = None):
    self.mesh = make_mesh(mesh_shape, devices)
    self.rules = tuple(logical_axis_rules if logical_axis_rules is not None
                       else standard_logical_axis_rules())

  @property
  def mesh_shape(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  @property
  def data_parallel_size(self) -> int:
    """How many ways the batch dimension is split (the `batch` rule's mesh axes)."""
    spec = nn.logical_to_mesh_axes(('batch',), self.rules)[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    return math.prod(self.mesh.shape[a] for a in axes)

  @contextlib.contextmanager
  def context(self):
    """The mesh and rules under which model code is traced and run."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def sharding(self, mesh_spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, mesh_spec)

  def logical_sharding(self, logical_axes: Sequence[Optional[str]]) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry these logical names."""
    spec = logical_to_mesh_specs(P(*logical_axes), self.rules)
    return NamedSharding(self.mesh, spec)

  def shardings_from_logical(self, logical_specs: Any) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on this mesh."""
    mesh_specs = logical_to_mesh_specs(logical_specs, self.rules)
    return jax.tree_util.tree_map(self.sharding, mesh_specs, is_leaf=lambda x: isinstance(x, P))

  def mesh_specs_from_boxed(self, abstract_boxed_tree: Any) -> Any:
    """Mesh PartitionSpecs of an (abstract) tree whose leaves are Flax LogicallyPartitioned boxes."""
    return logical_to_mesh_specs(nn.get_partition_spec(abstract_boxed_tree), self.rules)

  def partition(self, fn: Callable, in_shardings: Any = None, out_shardings: Any = None,
                donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()
                ) -> Callable:
    """`jax.jit` with pinned shardings; calls (and traces) run under this mesh and its rules."""
    kwargs = {}
    if in_shardings is not None:
      kwargs['in_shardings'] = in_shardings
    if out_shardings is not None:
      kwargs['out_shardings'] = out_shardings
    jitted = jax.jit(fn, donate_argnums=tuple(donate_argnums),
                     static_argnums=tuple(static_argnums), **kwargs)
    partitioner = self

    class _Partitioned:
      """Calls the jitted function inside the partitioner's context; exposes lower/compile."""

      def __call__(self, *args):
        with partitioner.context():
          return jitted(*args)

      def lower(self, *args):
        with partitioner.context():
          return jitted.lower(*args)

      def compile(self, *abstract_args) -> CompiledFunction:
        return partitioner.compile(jitted, *abstract_args)

    return _Partitioned()

  def compile(self, jitted: Callable, *abstract_args) -> CompiledFunction:
    """Lowers and compiles ahead of time; returns the executable and its memory analysis."""
    with self.context():
      lowered = jitted.lower(*abstract_args)
      compiled = lowered.compile()
    try:
      memory = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except  # not every backend reports memory
      memory = None
    try:
      cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except
      cost = None
    return CompiledFunction(compiled, memory, cost)

  def batch_shardings(self, batch_spec: Mapping[str, Any]) -> dict[str, NamedSharding]:
    """Per feature: leading (batch) dimension split by the `batch` rule, the rest whole."""
    return {name: self.logical_sharding(('batch',) + (None,) * (len(v.shape) - 1))
            for name, v in batch_spec.items()}

  def host_local_batch_to_global(self, local_batch: Mapping[str, np.ndarray],
                                 shardings: Optional[Mapping[str, NamedSharding]] = None,
                                 global_batch_size: Optional[int] = None
                                 ) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's rows (`make_array_from_process_local_data`).

    Args:
      local_batch: this process's rows of every feature: its share of the global batch, or the
        whole global batch (the same on every process), of which each device keeps its rows.
      shardings: the global arrays' shardings (pass the step function's, computed once, on the
        hot path); default `batch_shardings(local_batch)`.
      global_batch_size: rows of the global batch; None: `local_batch` is this process's share
        (rows per process times the process count).
    """
    shardings = shardings or self.batch_shardings(local_batch)

    def to_global(name, value):
      value = np.asarray(value)
      shape = None
      if global_batch_size is not None:
        # A leading size equal to the local one means "the whole array is here"; a larger one
        # means "these are my devices' rows"; the other dimensions are whole.
        shape = (global_batch_size,) + value.shape[1:]
      return jax.make_array_from_process_local_data(shardings[name], value, shape)

    return {name: to_global(name, value) for name, value in local_batch.items()}

def partition_spec_snapshot(mesh_specs: Any) -> dict[str, list]:
  """{parameter path: mesh PartitionSpec as a list} for golden-file checks of sharding rules."""
  flat, _ = jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=lambda x: isinstance(x, P))
  return {_path_str(path): [list(a) if isinstance(a, tuple) else a for a in spec]
          for path, spec in flat}
