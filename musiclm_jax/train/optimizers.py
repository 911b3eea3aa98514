"""Optax optimizers and learning-rate schedules, configured from gin."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """One parameter group's optimizer: schedule, update rule, clipping, weight decay.

  Attributes:
    name: 'adamw', 'adam', 'adafactor', 'sgd' or 'lion'.
    learning_rate: peak learning rate.
    schedule: 'constant', 'cosine' (warm-up then cosine decay to `end_factor * learning_rate`)
      or 'rsqrt' (warm-up then 1/sqrt(step), the T5 schedule).
    warmup_steps: linear warm-up from 0.
    decay_steps: length of the cosine decay after warm-up; usually bound to %TRAIN_STEPS.
    end_factor: final learning rate as a fraction of the peak (cosine).
    b1, b2, eps: moment decay rates and epsilon (Adam family, Lion).
    weight_decay: decoupled weight decay (adamw, lion); applied to every parameter with more
      than one dimension (not to norms, biases or scalars).
    grad_clip_norm: clip the group's gradients to this global norm first; None or 0 disables.
  """
  name: str = 'adamw'
  learning_rate: float = 1e-3
  schedule: str = 'cosine'
  warmup_steps: int = 0
  decay_steps: int = 10_000
  end_factor: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip_norm: Optional[float] = 1.0

  def learning_rate_fn(self) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The schedule: step -> learning rate."""
    lr, warm = self.learning_rate, self.warmup_steps
    if self.schedule == 'constant':
      if warm:
        return optax.linear_schedule(0.0, lr, warm)
      return optax.constant_schedule(lr)
    if self.schedule == 'cosine':
      return optax.warmup_cosine_decay_schedule(
          0.0, lr, warm, warm + max(1, self.decay_steps), end_value=lr * self.end_factor)
    if self.schedule == 'rsqrt':
      def rsqrt(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1.0) / max(1, warm))
        return lr * warmup * jnp.sqrt(max(1, warm) / jnp.maximum(step + 1.0, max(1, warm)))
      return rsqrt
    raise ValueError(f"OptimizerConfig.schedule: unknown schedule {self.schedule!r} "
                     "(expected 'constant', 'cosine' or 'rsqrt')")

  def build(self) -> optax.GradientTransformation:
    """The optax transformation (clipping first, then the update rule)."""
    lr = self.learning_rate_fn()
    mask = _matrices_only
    if self.name == 'adamw':
      rule = optax.adamw(lr, b1=self.b1, b2=self.b2, eps=self.eps,
                         weight_decay=self.weight_decay, mask=mask)
    elif self.name == 'adam':
      rule = optax.adam(lr, b1=self.b1, b2=self.b2, eps=self.eps)
    elif self.name == 'adafactor':
      rule = optax.adafactor(lr)
    elif self.name == 'sgd':
      rule = optax.sgd(lr, momentum=self.b1 or None)
    elif self.name == 'lion':
      rule = optax.lion(lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, mask=mask)
    else:
      raise ValueError(f"OptimizerConfig.name: unknown optimizer {self.name!r} "
                       "(expected 'adamw', 'adam', 'adafactor', 'sgd' or 'lion')")
    if self.grad_clip_norm:
      return optax.chain(optax.clip_by_global_norm(self.grad_clip_norm), rule)
    return rule


def _matrices_only(params):
  """Weight-decay mask: True for kernels and embeddings (ndim > 1), False for norms and biases."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) > 1, params)
