"""Train state, and the sharded init / train / eval step functions built from a model."""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from musiclm_jax.train.models import BaseModel
from musiclm_jax.train.partitioning import Partitioner

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; saved whole in every checkpoint.

  Attributes:
    step: batches consumed so far (a skipped non-finite step still consumes its batch).
    params: {group: parameters}.
    opt_state: {group: optimizer state}.
    model_state: non-trainable variables the forward pass updates (EMA codebooks, ...).
    rng: the run's base key; step t uses fold_in(rng, t), so resuming replays the same noise.
    skipped_in_a_row: consecutive steps whose loss or gradients were not finite.
    skipped_total: all such steps so far.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  rng: jax.Array
  skipped_in_a_row: jax.Array
  skipped_total: jax.Array


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(ok, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


class StepFunctions:
  """Builds sharded `init`, `train_step` and `eval_step` for a model on a partitioner.

  Shapes come from `jax.eval_shape`, shardings from the logical axis names on the parameters,
  so parameters and optimizer state are created already sharded by a jitted init.

  Args:
    model: the model (variables, losses, metrics, optimizers).
    partitioner: mesh and rules.
    batch_spec: {feature: ShapeDtypeStruct} of the global batch.
    gradient_accumulation_steps: split each batch into this many micro-batches, summing their
      gradients in a `lax.scan` (same update, less activation memory).
  """

  def __init__(self, model: BaseModel, partitioner: Partitioner,
               batch_spec: Mapping[str, jax.ShapeDtypeStruct],
               gradient_accumulation_steps: int = 1):
    self.model = model
    self.partitioner = partitioner
    self.batch_spec = dict(batch_spec)
    self.accum = int(gradient_accumulation_steps)
    global_batch = next(iter(self.batch_spec.values())).shape[0]
    if self.accum < 1 or global_batch % self.accum:
      raise ValueError(f'gradient_accumulation_steps={self.accum} must divide the batch size '
                       f'{global_batch}')
    self.groups = tuple(model.optimizers)
    self.txs = {g: cfg.build() for g, cfg in model.optimizers.items()}
    self.lr_fns = {g: cfg.learning_rate_fn() for g, cfg in model.optimizers.items()}
    self.replicated = partitioner.sharding(P())
    self.batch_shardings = partitioner.batch_shardings(self.batch_spec)
    self._build_shardings()
    self.init = partitioner.partition(self._init, in_shardings=(self.replicated,),
                                      out_shardings=self.state_shardings)
    self.train_step = partitioner.partition(
        self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self.eval_step = partitioner.partition(
        self._eval_step, in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=self.replicated)
    self.summary_step = None
    if model.has_eval_summaries:
      self.summary_step = partitioner.partition(
          self._summary_step, in_shardings=(self.state_shardings, self.batch_shardings),
          out_shardings=self.replicated)

  # ---------------------------------------------------------------- shapes and shardings
  def _boxed_variables(self, rng):
    return self.model.init_variables(rng, self.batch_spec)

  def _build_shardings(self):
    rng = jax.random.PRNGKey(0)
    with self.partitioner.context():
      abstract_boxed = jax.eval_shape(self._boxed_variables, rng)
    # Raises, naming the parameter, when a logical axis is not in the rules.
    self.variable_mesh_specs = self.partitioner.mesh_specs_from_boxed(abstract_boxed)
    var_shardings = jax.tree_util.tree_map(
        self.partitioner.sharding, self.variable_mesh_specs, is_leaf=lambda x: isinstance(x, P))
    abstract_vars = nn.unbox(abstract_boxed)
    opt_shardings = {}
    for g in self.groups:
      abstract_opt = jax.eval_shape(self.txs[g].init, abstract_vars['params'][g])
      # Optimizer moments mirror their parameters' shardings; counters are replicated.
      opt_shardings[g] = optax.tree_utils.tree_map_params(
          self.txs[g], lambda _, s: s, abstract_opt, var_shardings['params'][g],
          transform_non_params=lambda _: self.replicated)
    r = self.replicated
    self.state_shardings = TrainState(
        step=r, params=var_shardings['params'], opt_state=opt_shardings,
        model_state=var_shardings['model_state'], rng=r, skipped_in_a_row=r, skipped_total=r)
    with self.partitioner.context():
      self.abstract_state = jax.eval_shape(self._init, rng)

  def param_mesh_specs(self) -> PyTree:
    """Mesh PartitionSpecs of the parameters ({group: tree})."""
    return self.variable_mesh_specs['params']

  # ---------------------------------------------------------------- step functions
  def _init(self, rng) -> TrainState:
    param_rng, run_rng = jax.random.split(rng)
    variables = nn.unbox(self._boxed_variables(param_rng))
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state={g: self.txs[g].init(params[g]) for g in self.groups},
        model_state=variables['model_state'], rng=run_rng,
        skipped_in_a_row=jnp.zeros((), jnp.int32), skipped_total=jnp.zeros((), jnp.int32))

  def _grads(self, params, model_state, batch, rng):
    """Per group: the gradient of that group's loss with respect to that group's parameters."""
    if self.model.losses_are_decoupled:
      # One forward and one backward pass: each loss only reaches its own group's parameters
      # (the model put stop_gradient where the groups meet), so d(sum)/d(group) is exactly
      # d(group's loss)/d(group).
      def total(all_params):
        losses, m, ms = self.model.compute_losses(all_params, model_state, batch, rng)
        return sum(losses[g] for g in self.groups), (losses, m, ms)
      (_, (losses, m, new_model_state)), grads = jax.value_and_grad(total, has_aux=True)(params)
      metrics = dict(m)
      metrics.update({f'loss/{k}': v for k, v in losses.items()})
      return grads, metrics, new_model_state
    grads, metrics = {}, {}
    new_model_state = model_state
    for g in self.groups:
      def loss_of(group_params, g=g):
        full = dict(params)
        full[g] = group_params
        losses, m, ms = self.model.compute_losses(full, model_state, batch, rng)
        return losses[g], (losses, m, ms)
      (_, (losses, m, ms)), grads[g] = jax.value_and_grad(loss_of, has_aux=True)(params[g])
      metrics.update(m)
      metrics.update({f'loss/{k}': v for k, v in losses.items()})
      new_model_state = ms
    return grads, metrics, new_model_state

  def _train_step(self, state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if self.accum == 1:
      grads, metrics, model_state = self._grads(state.params, state.model_state, batch, rng)
    else:
      k = self.accum
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
      micro = {name: nn.with_logical_constraint(
          x, (None, 'batch') + (None,) * (x.ndim - 2)) for name, x in micro.items()}
      shapes = jax.eval_shape(self._grads, state.params, state.model_state,
                              jax.tree_util.tree_map(lambda x: x[0], micro), rng)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:2])

      def body(carry, xs):
        acc, ms = carry
        mb, i = xs
        g, m, ms = self._grads(state.params, ms, mb, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, acc, (g, m)), ms), None

      (acc, model_state), _ = jax.lax.scan(
          body, (zeros, state.model_state), (micro, jnp.arange(k)))
      grads, metrics = jax.tree_util.tree_map(lambda x: x / k, acc)

    ok = _all_finite(grads) & _all_finite(metrics)
    new_params, new_opt = {}, {}
    for g in self.groups:
      updates, new_opt[g] = self.txs[g].update(grads[g], state.opt_state[g], state.params[g])
      new_params[g] = optax.apply_updates(state.params[g], updates)
      metrics[f'grad_norm/{g}'] = optax.global_norm(grads[g])
      metrics[f'learning_rate/{g}'] = jnp.asarray(self.lr_fns[g](state.step), jnp.float32)
    skipped_in_a_row = jnp.where(ok, 0, state.skipped_in_a_row + 1)
    skipped_total = state.skipped_total + (1 - ok.astype(jnp.int32))
    metrics['skipped_step'] = 1.0 - ok.astype(jnp.float32)
    metrics['skipped_in_a_row'] = skipped_in_a_row
    metrics['skipped_total'] = skipped_total
    new_state = state.replace(
        step=state.step + 1,
        params=_select(ok, new_params, state.params),
        opt_state=_select(ok, new_opt, state.opt_state),
        model_state=_select(ok, model_state, state.model_state),
        skipped_in_a_row=skipped_in_a_row, skipped_total=skipped_total)
    return new_state, metrics

  def _eval_step(self, state: TrainState, batch):
    return self.model.eval_metrics(state.params, state.model_state, batch)

  def _summary_step(self, state: TrainState, batch):
    return self.model.eval_summaries(state.params, state.model_state, batch)
