"""Stage 1: train the digits teacher, a small text-conditioned eps-prediction U-Net, and save it.

The model is our Flax `UNet2DConditionModel` (the SD1.5 module) with the small ``config.digits`` architecture,
in pixel space: samples (B, R, R, 1) grey in [-1, 1]. Loss (DDPM / SD): t ~ U{0..N-1}, eps ~ N(0, I),
z_t = alpha_t x0 + sigma_t eps on ``config.schedule`` (SD1.5's scaled_linear), MSE between the U-Net output and
the schedule's target (eps for SD1.5). With probability ``prompt_dropout`` an example's context is the empty
prompt's, so one network gives both CFG branches. AdamW (``config.optim`` betas, eps, weight decay, gradient
clipping) with linear warmup and cosine decay to lr/10, and an EMA of the weights (decay ``teacher_ema`` with
diffusers' warmup min(mu, (1 + k)/(10 + k))) that is what gets saved and sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scott_jax.config import ConfigDict
from scott_jax.digits import loop
from scott_jax.digits.data import UNCOND
from scott_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params
from scott_jax.schedules import NoiseSchedule

Array = jax.Array
PyTree = Any
EVAL_EXAMPLES = 256  # size of the fixed held-out denoising-loss batch


def unet_config(d: ConfigDict, cross_attention_dim: int) -> UNetConfig:
  """The teacher architecture from ``config.digits`` (1 channel in and out, sample_size = resolution)."""
  n = len(d.unet_channels)
  return UNetConfig(sample_size=d.resolution, in_channels=1, out_channels=1,
                    down_block_types=tuple(d.unet_down_blocks), up_block_types=tuple(d.unet_up_blocks),
                    block_out_channels=tuple(d.unet_channels), layers_per_block=(d.unet_layers_per_block,) * n,
                    transformer_layers_per_block=(1,) * n, attention_head_dim=tuple(d.unet_heads),
                    cross_attention_dim=cross_attention_dim, norm_num_groups=d.unet_norm_groups)


def make_optimizer(config: ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with warmup + cosine decay (teacher_lr -> teacher_lr / 10)."""
  d, o = config.digits, config.optim
  lr = optax.warmup_cosine_decay_schedule(0.0, d.teacher_lr, max(d.teacher_warmup, 1),
                                          max(d.teacher_steps, d.teacher_warmup + 1), d.teacher_lr / 10)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def denoising_loss(unet: UNet2DConditionModel, schedule: NoiseSchedule, params: PyTree, x0: Array, t: Array,
                   eps: Array, context: Array) -> Array:
  """Mean squared error between the U-Net output at z_t = alpha_t x0 + sigma_t eps and the schedule's target;
  x0, eps (B, R, R, 1), t (B,) int, context (B, L, D)."""
  z = schedule.add_noise(x0, eps, t)
  out = unet.apply(params, z, t, context)
  return jnp.mean(jnp.square(out - schedule.target(x0, eps, t)))


def make_step(config: ConfigDict, unet: UNet2DConditionModel, schedule: NoiseSchedule,
              tx: optax.GradientTransformation, table: Array) -> Callable:
  """step(state, batch) -> (state, metrics); batch = {"x0": (B, R, R, 1), "labels": (B,)}; ``table`` is the
  (11, L, D) prompt-embedding table (row 10: empty prompt). Pure; jit it."""
  d = config.digits
  n_train = schedule.num_train_timesteps

  def step(state: PyTree, batch: dict[str, Array]) -> tuple[PyTree, dict[str, Array]]:
    k_t, k_eps, k_drop = jax.random.split(loop.step_key(d.teacher_seed, state["step"]), 3)
    x0, labels = batch["x0"], batch["labels"]
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, n_train)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    drop = jax.random.bernoulli(k_drop, d.prompt_dropout, (b,))
    context = table[jnp.where(drop, UNCOND, labels)]
    loss, grads = jax.value_and_grad(lambda p: denoising_loss(unet, schedule, p, x0, t, eps, context))(
      state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # EMA with the usual warmup (diffusers EMAModel): decay min(teacher_ema, (1 + k) / (10 + k)) at update k.
    k = state["step"].astype(jnp.float32)
    mu = jnp.minimum(d.teacher_ema, (1.0 + k) / (10.0 + k))
    ema = jax.tree_util.tree_map(lambda e, p: mu * e + (1.0 - mu) * p, state["ema"], params)
    new = {"step": state["step"] + 1, "params": params, "ema": ema, "opt": opt}
    return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return step


def make_eval_fn(unet: UNet2DConditionModel, schedule: NoiseSchedule, table: Array, images: np.ndarray,
                 labels: np.ndarray, seed: int = 1234) -> Callable[[PyTree], dict[str, float]]:
  """Held-out denoising loss on a fixed batch (the first EVAL_EXAMPLES test images with their prompts, t on an
  even grid over 0..N-1, fixed eps): eval_fn(state) -> {"eval_loss", "eval_loss_ema"}."""
  n = min(EVAL_EXAMPLES, len(labels))
  x0 = jnp.asarray(images[:n])
  t = jnp.asarray(np.linspace(0, schedule.num_train_timesteps - 1, n).round().astype(np.int32))
  eps = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
  context = jnp.asarray(table)[jnp.asarray(labels[:n])]
  loss = jax.jit(lambda p: denoising_loss(unet, schedule, p, x0, t, eps, context))

  def eval_fn(state: PyTree) -> dict[str, float]:
    return {"eval_loss": float(loss(state["params"])), "eval_loss_ema": float(loss(state["ema"]))}

  return eval_fn


def train(config: ConfigDict, directory: str, train_x0: np.ndarray, train_labels: np.ndarray,
          test_x0: np.ndarray, test_labels: np.ndarray, table: np.ndarray,
          stop_at: int | None = None) -> tuple[UNetConfig, PyTree, int]:
  """Trains (or resumes) the teacher under ``directory``; returns (UNetConfig, EMA params, steps done).

  train_x0 / test_x0: float32 (N, R, R, 1) in [-1, 1]; labels int (N,); table: `data.encode_prompts` output.
  The batch of update k is ``train[rng([teacher_seed, k]).choice(N, B)]``.
  """
  d = config.digits
  schedule = NoiseSchedule.from_config(config.schedule)
  ucfg = unet_config(d, int(table.shape[-1]))
  unet = UNet2DConditionModel(ucfg)
  tx = make_optimizer(config)
  table_j = jnp.asarray(table)

  def init_state() -> PyTree:
    params = init_params(jax.random.key(d.teacher_seed), ucfg, context_length=int(table.shape[1]))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema": jax.tree_util.tree_map(jnp.copy, params), "opt": tx.init(params)}

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    idx = np.random.default_rng([d.teacher_seed, step]).choice(len(train_labels), d.teacher_batch)
    return {"x0": train_x0[idx], "labels": train_labels[idx].astype(np.int32)}

  step_fn = jax.jit(make_step(config, unet, schedule, tx, table_j), donate_argnums=(0,))
  state = loop.run(name="teacher", directory=directory, init_state=init_state, step_fn=step_fn,
                   batch_fn=batch_fn, num_steps=d.teacher_steps, checkpoint_every=d.checkpoint_every,
                   log_every=d.log_every, eval_fn=make_eval_fn(unet, schedule, table_j, test_x0, test_labels),
                   stop_at=stop_at)
  return ucfg, state["ema"], int(state["step"])
