"""The digit classifier: the digits experiment's stand-in for Inception (FID / coverage features) and for CLIP
(its accuracy on generated digits against the prompted digit plays the role of CLIP score).

A small CNN on the grey value (channel mean) of (B, R, R, C) images in [-1, 1]: two 3x3 conv + ReLU pairs with
2x2 average pooling after each pair (``classifier_widths`` channels, default 16 then 32), flatten,
Dense(features) (the FEATURES: the pre-activation of the penultimate layer, ``classifier_features``-dimensional),
ReLU, Dense(10) logits.
Trained with softmax cross-entropy on the training split only, AdamW with cosine decay, and random one-pixel
translations (edge padding with the background value) as augmentation; checkpointed and resumable through
`scott_jax.digits.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scott_jax.config import ConfigDict
from scott_jax.digits import loop
from scott_jax.digits.data import NUM_CLASSES, PROMPT_PREFIX, WORDS

Array = jax.Array
PyTree = Any


class DigitClassifier(nn.Module):
  """(B, R, R, C) images in [-1, 1] -> (logits (B, 10), features (B, features))."""

  features: int = 64
  widths: tuple[int, ...] = (16, 32)

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = jnp.mean(x, axis=-1, keepdims=True)
    for width in self.widths:
      h = nn.relu(nn.Conv(width, (3, 3))(h))
      h = nn.relu(nn.Conv(width, (3, 3))(h))
      h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    feats = nn.Dense(self.features, name="features")(h.reshape(h.shape[0], -1))
    return nn.Dense(NUM_CLASSES, name="logits")(nn.relu(feats)), feats


def shift(x: Array, key: Array, max_shift: int = 1) -> Array:
  """Random integer translations of each image by up to ``max_shift`` pixels (x (B, H, W, C)), filling with
  the background value -1."""
  b, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


def make_step(config: ConfigDict, model: DigitClassifier, tx: optax.GradientTransformation) -> Callable:
  """step(state, batch) -> (state, metrics); batch = {"x": (B, R, R, C), "labels": (B,)}. Pure; jit it."""
  d = config.digits

  def step(state: PyTree, batch: dict[str, Array]) -> tuple[PyTree, dict[str, Array]]:
    x = shift(batch["x"], loop.step_key(d.classifier_seed, state["step"]))

    def loss_fn(params: PyTree) -> tuple[Array, Array]:
      logits, _ = model.apply(params, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch["labels"])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates), "opt": opt}
    return new, {"loss": loss, "train_acc": acc}

  return step


def make_apply(model: DigitClassifier, batch_size: int = 500) -> Callable[[PyTree, np.ndarray], tuple[np.ndarray,
                                                                                                       np.ndarray]]:
  """apply(params, x (N, R, R, C) float32 in [-1, 1]) -> (logits (N, 10), features (N, F)) numpy float32, in
  batches of ``batch_size`` (the last one padded, so one compiled shape)."""
  fn = jax.jit(model.apply)

  def apply(params: PyTree, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, feats = [], []
    for start in range(0, len(x), batch_size):
      chunk = np.asarray(x[start:start + batch_size], np.float32)
      n = len(chunk)
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
      lo, fe = fn(params, jnp.asarray(chunk))
      logits.append(np.asarray(lo)[:n])
      feats.append(np.asarray(fe)[:n])
    return np.concatenate(logits), np.concatenate(feats)

  return apply


def train(config: ConfigDict, directory: str, train_x: np.ndarray, train_labels: np.ndarray,
          test_x: np.ndarray, test_labels: np.ndarray, stop_at: int | None = None) -> tuple[DigitClassifier, PyTree]:
  """Trains (or resumes) the classifier under ``directory``; returns (module, params).

  The batch of update k is ``train[rng([classifier_seed + 1, k]).choice(N, B)]``; test accuracy is logged.
  """
  d = config.digits
  model = DigitClassifier(d.classifier_features, tuple(d.classifier_widths))
  lr = optax.cosine_decay_schedule(d.classifier_lr, d.classifier_steps, alpha=0.05)
  tx = optax.adamw(lr, weight_decay=1e-4)
  apply = make_apply(model)

  def init_state() -> PyTree:
    params = model.init(jax.random.key(d.classifier_seed), jnp.zeros((1, *train_x.shape[1:]), jnp.float32))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    idx = np.random.default_rng([d.classifier_seed + 1, step]).choice(len(train_labels), d.classifier_batch)
    return {"x": train_x[idx], "labels": train_labels[idx].astype(np.int32)}

  def eval_fn(state: PyTree) -> dict[str, float]:
    logits, _ = apply(state["params"], test_x)
    return {"test_acc": float(np.mean(np.argmax(logits, -1) == test_labels))}

  step_fn = jax.jit(make_step(config, model, tx), donate_argnums=(0,))
  log_every = max(d.classifier_steps // 5, 1)
  state = loop.run(name="classifier", directory=directory, init_state=init_state, step_fn=step_fn,
                   batch_fn=batch_fn, num_steps=d.classifier_steps, checkpoint_every=d.classifier_steps,
                   log_every=log_every, eval_fn=eval_fn, stop_at=stop_at)
  return model, state["params"]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of argmax(logits) == labels."""
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


EXPORT_PARAMS, EXPORT_CONFIG = "classifier.msgpack", "classifier.json"


def export(folder: str, model: DigitClassifier, params: PyTree) -> None:
  """Writes the trained classifier to ``folder`` (classifier.msgpack: flax-serialised params; classifier.json:
  the module's fields), for `eval_features` (the eval job's pluggable feature extractor)."""
  import json
  import os

  from flax import serialization

  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, EXPORT_PARAMS), "wb") as fh:
    fh.write(serialization.to_bytes(jax.device_get(params)))
  with open(os.path.join(folder, EXPORT_CONFIG), "w") as fh:
    json.dump({"features": model.features, "widths": list(model.widths)}, fh)


def load_export(folder: str) -> tuple[DigitClassifier, PyTree]:
  """(module, params) written by `export`; FileNotFoundError names a missing file."""
  import json
  import os

  from flax import serialization

  for name in (EXPORT_PARAMS, EXPORT_CONFIG):
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f"no {name} in {folder} (written by the digits classifier stage)")
  with open(os.path.join(folder, EXPORT_CONFIG)) as fh:
    fields = json.load(fh)
  model = DigitClassifier(int(fields["features"]), tuple(fields["widths"]))
  target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.float32))
  with open(os.path.join(folder, EXPORT_PARAMS), "rb") as fh:
    params = serialization.from_bytes(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), target),
                                      fh.read())
  return model, params


def eval_features(ec: Any) -> Callable[[np.ndarray], np.ndarray]:
  """Feature extractor for the eval job (``eval.features = "scott_jax.digits.classifier:eval_features"``,
  ``eval.feature_weights`` = the `export` folder, e.g. WORKDIR/classifier/export): uint8 images (N, H, W, 3)
  -> the classifier's features (N, F) float32 (images scaled to [-1, 1], grey = channel mean)."""
  apply = uint8_apply(ec.feature_weights)
  return lambda images: apply(images)[1]


def uint8_apply(folder: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """The classifier exported to ``folder`` on uint8 images (N, H, W, 3) (scaled to [-1, 1], grey = channel
  mean) -> (logits (N, 10), features (N, F)) float32."""
  model, params = load_export(folder)
  apply = make_apply(model)
  return lambda images: apply(params, np.asarray(images, np.float32) / 127.5 - 1.0)


def prompted_digits(prompts: list[str]) -> np.ndarray:
  """The digit (N,) int32 of each prompt "a handwritten digit <word>" (`scott_jax.digits.data.prompt`); a prompt
  of another form raises ValueError naming it."""
  out = []
  for p in prompts:
    head, _, word = p.strip().rpartition(" ")
    if head != PROMPT_PREFIX or word not in WORDS:
      raise ValueError(f"prompt {p!r} is not '{PROMPT_PREFIX} <word>' with a word of {', '.join(WORDS)}")
    out.append(WORDS.index(word))
  return np.asarray(out, np.int32)


def prompt_accuracy(ec: Any) -> Callable[[np.ndarray, list[str]], np.ndarray]:
  """Prompt metric for the eval job (``eval.prompt_metric = "scott_jax.digits.classifier:prompt_accuracy"``,
  classifier folder ``eval.feature_weights`` as for `eval_features`): (uint8 images (N, H, W, 3), N prompts)
  -> (N,) float32, 1 where the classifier's argmax class is the prompted digit, else 0 (its mean: the accuracy
  against the prompted digit, the digits experiment's CLIP-score analogue)."""
  apply = uint8_apply(ec.feature_weights)

  def scores(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    digits = prompted_digits(prompts)
    logits, _ = apply(images)
    return (np.argmax(logits, axis=-1) == digits).astype(np.float32)

  return scores
