"""LoRA overlays: merge vs dense numpy and PEFT layers, identity at init, masks, PEFT export for diffusers."""

from __future__ import annotations

import json
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# A CUDA torchvision wheel next to CPU torch fails to import; hide it so transformers treats it as absent.
try:
  import torchvision  # noqa: F401
except (ImportError, RuntimeError, OSError):
  sys.modules["torchvision"] = None

import torch  # noqa: E402

from scott_jax.models import loading, lora  # noqa: E402


def _torch_to_flax(module: str) -> str:
  return "/".join(loading.torch_module_to_flax(module)) + "/kernel"


def _flax_to_torch(path: str) -> str:
  return loading.flax_to_torch_module(path.removesuffix("/kernel"))


def _toy_params(rng: np.random.Generator) -> dict:
  """A nested param dict with U-Net-like names: attention, feed-forward, resnet convs, norms and biases."""
  def block(prefix_out: int) -> dict:
    c = 8
    return {
      "attentions_0": {
        "proj_in": {"kernel": rng.standard_normal((1, 1, c, c)).astype(np.float32),
                    "bias": np.zeros(c, np.float32)},
        "transformer_blocks_0": {
          "attn1": {
            "to_q": {"kernel": rng.standard_normal((c, c)).astype(np.float32)},
            "to_k": {"kernel": rng.standard_normal((c, c)).astype(np.float32)},
            "to_v": {"kernel": rng.standard_normal((c, c)).astype(np.float32)},
            "to_out_0": {"kernel": rng.standard_normal((c, c)).astype(np.float32),
                         "bias": np.zeros(c, np.float32)},
          },
          "attn2": {"to_k": {"kernel": rng.standard_normal((6, c)).astype(np.float32)}},
          "ff": {"net_0": {"proj": {"kernel": rng.standard_normal((c, 4 * c)).astype(np.float32)}},
                 "net_2": {"kernel": rng.standard_normal((2 * c, c)).astype(np.float32)}},
          "norm1": {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)},
        },
      },
      "resnets_0": {
        "conv1": {"kernel": rng.standard_normal((3, 3, c, prefix_out)).astype(np.float32)},
        "time_emb_proj": {"kernel": rng.standard_normal((16, prefix_out)).astype(np.float32)},
      },
    }

  return {"down_blocks_0": block(8), "up_blocks_0": block(12),
          "time_embedding": {"linear_1": {"kernel": rng.standard_normal((4, 16)).astype(np.float32)}}}


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in leaves}


def test_select_targets_presets_and_scope():
  params = _toy_params(np.random.default_rng(0))
  attn = lora.select_targets(params, "attention")
  assert attn == sorted(
    f"{b}/attentions_0/transformer_blocks_0/{a}/kernel"
    for b in ("down_blocks_0", "up_blocks_0")
    for a in ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out_0", "attn2/to_k"))
  ff_up = lora.select_targets(params, ["feed_forward", "conv"], scope=r"^up_blocks_")
  assert ff_up == sorted(["up_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel",
                          "up_blocks_0/attentions_0/transformer_blocks_0/ff/net_2/kernel",
                          "up_blocks_0/resnets_0/conv1/kernel"])
  assert lora.select_targets(params, [r"time_emb_proj/kernel$"]) == [
    "down_blocks_0/resnets_0/time_emb_proj/kernel", "up_blocks_0/resnets_0/time_emb_proj/kernel"]
  with pytest.raises(ValueError, match="only 2-D and 4-D"):
    lora.select_targets(params, r"norm1/scale$")
  with pytest.raises(ValueError, match="no parameter matches"):
    lora.select_targets(params, "attention", scope="^mid_block")


@pytest.mark.parametrize("init_a", ["kaiming", "gaussian"])
def test_init_is_identity_and_follows_peft_init(init_a):
  params = _toy_params(np.random.default_rng(1))
  rank = 4
  targets = ["attention", "feed_forward", "conv", "proj"]
  tree = lora.init(jax.random.key(0), params, targets, rank, init_a=init_a)
  merged = lora.merge(params, tree, alpha=8.0)
  for name, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(merged)[name], value)  # bit-identical: B = 0
  flat = _flat(tree)
  assert all(np.all(v == 0) for k, v in flat.items() if k.endswith("lora_B"))
  for name, a in flat.items():
    if not name.endswith("lora_A"):
      continue
    # The torch layer PEFT would initialise: weight (r, in[, kh, kw]).
    t = torch.empty(rank, *a.shape[-2::-1] if a.ndim == 2 else (a.shape[2], a.shape[0], a.shape[1]))
    if init_a == "kaiming":
      torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
      fan_in = torch.nn.init._calculate_fan_in_and_fan_out(t)[0]
      bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
      assert np.abs(a).max() <= bound and np.abs(t.numpy()).max() <= bound
      assert np.abs(a).max() > 0.5 * bound
    assert a.shape[-1] == rank and a.dtype == np.float32
  if init_a == "gaussian":
    all_a = np.concatenate([v.ravel() for k, v in flat.items() if k.endswith("lora_A")])
    assert abs(all_a.std() - 1.0 / rank) < 0.1 / rank and abs(all_a.mean()) < 0.1 / rank


def _random_overlay(tree, rng: np.random.Generator, b_scale: float = 0.3):
  """Perturb both A and B so that the overlay is not the identity."""
  return jax.tree_util.tree_map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * b_scale), tree)


def test_merge_matches_dense_numpy_and_jit():
  rng = np.random.default_rng(2)
  params = _toy_params(rng)
  tree = lora.init(jax.random.key(1), params, ["attention", "feed_forward", "conv"], 3)
  tree = _random_overlay(tree, rng)
  alpha = 5.0
  merged = lora.merge(params, tree, alpha)
  merged_jit = jax.jit(lora.merge, static_argnums=2)(params, tree, alpha)
  flat_p, flat_l, flat_m = _flat(params), _flat(tree), _flat(merged)
  overlaid = {k.removesuffix("/lora_A") for k in flat_l if k.endswith("/lora_A")}
  for name, w in flat_p.items():
    if name not in overlaid:
      np.testing.assert_array_equal(flat_m[name], w)
      continue
    a, b = flat_l[name + "/lora_A"].astype(np.float64), flat_l[name + "/lora_B"].astype(np.float64)
    s = alpha / a.shape[-1]
    if w.ndim == 2:  # Flax (in, out): W + s (B_t A_t)^T with torch B_t = b.T, A_t = a.T
      ref = w + s * (b.T @ a.T).T
    else:  # HWIO: every kernel tap is its own dense map
      ref = w.copy()
      for i in range(w.shape[0]):
        for j in range(w.shape[1]):
          ref[i, j] += s * (a[i, j] @ b[0, 0])
    np.testing.assert_allclose(flat_m[name], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_flat(merged_jit)[name], flat_m[name], rtol=1e-6, atol=1e-6)
  with pytest.raises(KeyError):
    lora.merge({"other": {"kernel": np.zeros((2, 2))}}, tree, alpha)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_lora_matches_peft_layer(stride):
  from peft import LoraConfig, inject_adapter_in_model

  torch.manual_seed(0)
  rank, alpha, c_in, c_out = 3, 6.0, 5, 7

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)

    def forward(self, x):
      return self.conv(x)

  net = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["conv"]), Net())
  with torch.no_grad():
    net.conv.lora_B["default"].weight.normal_()  # B = 0 at init: perturb it so the test can fail
  x = torch.randn(2, c_in, 9, 9)
  with torch.no_grad():
    ref = net(x).numpy()
  base = net.conv.base_layer
  params = {"conv": {"kernel": base.weight.detach().numpy().transpose(2, 3, 1, 0),
                     "bias": base.bias.detach().numpy()}}
  tree = {"conv": {"kernel": {
    "lora_A": net.conv.lora_A["default"].weight.detach().numpy().transpose(2, 3, 1, 0),  # (3, 3, in, r)
    "lora_B": net.conv.lora_B["default"].weight.detach().numpy().transpose(2, 3, 1, 0),  # (1, 1, r, out)
  }}}
  def conv(p):  # NCHW in and out, as torch
    y = jax.lax.conv_general_dilated(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), p["conv"]["kernel"],
                                     (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.asarray(y + p["conv"]["bias"]).transpose(0, 3, 1, 2)

  np.testing.assert_allclose(conv(lora.merge(params, tree, alpha)), ref, rtol=1e-5, atol=1e-5)
  # Without the overlay the outputs differ: the LoRA term is not negligible.
  assert np.abs(conv(params) - ref).max() > 1e-2
  # The factorised form on a flax nn.Conv (A with the layer's stride and padding, then B 1x1) is PEFT's layer.
  module = nn.Sequential([nn.Conv(c_out, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))])
  with lora.factorised({"layers_0": tree["conv"]}, alpha):
    got = module.apply({"params": {"layers_0": params["conv"]}}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


class _DenseNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(4, name="hidden")(x)))


def test_factorised_matches_merge_with_gradients_and_never_drops_an_overlay():
  """lora.factorised on nn.Dense layers: the merged function and its gradients wrt the overlay and the input
  (float32), with or without the ``params`` level in the overlay's paths; an overlay no call uses raises."""
  rng = np.random.default_rng(5)
  net = _DenseNet()
  x = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
  params = net.init(jax.random.key(0), x)
  tree = _random_overlay(lora.init(jax.random.key(1), params, r"(hidden|out)/kernel$", 2), rng)
  alpha = 3.0

  def merged(t, x):
    return jnp.sum(jnp.sin(net.apply(lora.merge(params, t, alpha), x)))

  def factorised(t, x):
    with lora.factorised(t, alpha):
      return jnp.sum(jnp.sin(net.apply(params, x)))

  want = jax.value_and_grad(merged, argnums=(0, 1))(tree, x)
  got = jax.jit(jax.value_and_grad(factorised, argnums=(0, 1)))(tree, x)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  with lora.factorised(tree["params"], alpha):  # the same overlay without the "params" level
    y = net.apply(params, x)
  np.testing.assert_allclose(y, net.apply(lora.merge(params, tree, alpha), x), rtol=1e-5)
  stray = {"params": {**tree["params"], "missing": {"kernel": tree["params"]["out"]["kernel"]}}}
  with pytest.raises(ValueError, match="1 LoRA overlays were not applied.*missing/kernel"):
    with lora.factorised(stray, alpha):
      net.apply(params, x)


def test_trainable_mask_and_multi_transform():
  rng = np.random.default_rng(3)
  params = _toy_params(rng)
  tree = lora.init(jax.random.key(2), params, "attention", 2)
  state = {"base": params, "lora": tree, "head": {"conv": {"kernel": np.ones((3, 3, 8, 1), np.float32)}}}
  mask = lora.trainable_mask(state)
  flat_mask = _flat(mask)
  assert {k for k, v in flat_mask.items() if v} == {k for k in _flat(state) if k.startswith("lora/")}
  mask2 = lora.trainable_mask(state, [r"^lora/", r"^head/"])
  assert {k for k, v in _flat(mask2).items() if v} == {k for k in _flat(state) if not k.startswith("base/")}
  # Per block: 4 attn1 projections 8 -> 8 and attn2.to_k 6 -> 8, A (in, 2) and B (2, out) each; two blocks.
  expected = 2 * (4 * (8 * 2 + 2 * 8) + (6 * 2 + 2 * 8))
  assert lora.count_params(tree) == sum(v.size for v in _flat(tree).values()) == expected
  assert lora.count_params(state) == sum(np.size(v) for v in jax.tree_util.tree_leaves(state))
  for targets, scope in [("attention", None), (["feed_forward", "conv", "proj"], r"^up_blocks_")]:
    size = lora.overlay_size(params, targets, 3, scope=scope)
    assert size == lora.count_params(lora.init(jax.random.key(0), params, targets, 3, scope=scope))

  labels = lora.mask_labels(mask2)
  tx = optax.multi_transform({"trainable": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels)
  state = jax.tree_util.tree_map(jnp.asarray, state)
  grads = jax.tree_util.tree_map(jnp.ones_like, state)
  updates, _ = tx.update(grads, tx.init(state), state)
  new = optax.apply_updates(state, updates)
  for name, value in _flat(new).items():
    changed = not np.array_equal(value, _flat(state)[name])
    assert changed == _flat(mask2)[name], name


def test_export_import_round_trip_bit_exact(tmp_path):
  rng = np.random.default_rng(4)
  params = _toy_params(rng)
  tree = lora.init(jax.random.key(3), params, ["attention", "conv"], 4)
  extra = lora.init(jax.random.key(4), params, "feed_forward", 2)  # mixed ranks
  tree = _random_overlay({**_merge_dicts(tree, extra)}, rng)
  path = str(tmp_path / "lora.safetensors")
  lora.export_peft(path, {"params": tree}, 3.5)  # the default key mapping, a Flax "params" wrapper
  back, alpha = lora.import_peft(path)
  assert alpha == 3.5
  a, b = _flat(tree), _flat(back)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  from safetensors import safe_open

  with safe_open(path, framework="np") as fh:
    meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    keys = set(fh.keys())
  assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 3.5
  assert set(meta["unet.rank_pattern"].values()) == {2}
  assert "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in keys
  assert "unet.down_blocks.0.resnets.0.conv1.lora_B.weight" in keys

  # The pipeline loader (`load_lora_weights` -> `lora_state_dict`) reads the same keys, no kohya alphas, and
  # our LoraConfig from the metadata.
  from diffusers import StableDiffusionPipeline

  sd, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
  assert set(sd) == keys and network_alphas is None
  assert metadata["unet.lora_alpha"] == 3.5 and metadata["unet.r"] == 4


def _merge_dicts(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge_dicts(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def _tiny_torch_unet():
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  return UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12, attention_head_dim=4, norm_num_groups=8)


def test_merged_unet_matches_diffusers_with_lora_adapter(tmp_path):
  """End to end: our U-Net with `merge`d weights == diffusers' U-Net + `load_lora_adapter` of our export."""
  from diffusers import UNet2DConditionModel
  from peft.tuners.lora import LoraLayer

  folder = str(tmp_path / "unet")
  _tiny_torch_unet().save_pretrained(folder)
  module, params = loading.load_unet(folder)
  rng = np.random.default_rng(6)
  # Targets in the decoder half and the mid block (the discriminator's trainable part), through the wrapper.
  tree = lora.init(jax.random.key(6), params, ["attention", "feed_forward", "conv", "proj"], 4,
                   scope=r"^params/(up_blocks_|mid_block)")
  tree = _random_overlay(tree, rng, b_scale=0.1)
  alpha = 3.0
  path = str(tmp_path / "pytorch_lora_weights.safetensors")
  lora.export_peft(path, tree, alpha)

  sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW, as torch
  context = rng.standard_normal((2, 5, 12)).astype(np.float32)
  timesteps = np.array([999, 37], np.int64)

  apply = jax.jit(module.apply)

  def ours(p):
    x = jnp.asarray(sample.transpose(0, 2, 3, 1))
    return np.asarray(apply(p, x, jnp.asarray(timesteps), jnp.asarray(context))).transpose(0, 3, 1, 2)

  ref_unet = UNet2DConditionModel.from_pretrained(folder).eval()
  ref_unet.load_lora_adapter(path, prefix="unet", use_safetensors=True)
  # PEFT wrapped exactly our targets, with our alpha / r.
  layers = {n: m for n, m in ref_unet.named_modules() if isinstance(m, LoraLayer)}
  targets = {_flax_to_torch(k.removeprefix("params/").removesuffix("/lora_A"))
             for k in _flat(tree) if k.endswith("lora_A")}
  assert set(layers) == targets and len(targets) > 10
  assert {m.scaling["default_0"] for m in layers.values()} == {alpha / 4}
  with torch.no_grad():
    ref = ref_unet(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
  ref = ref.numpy()
  got = ours(jax.jit(lora.merge, static_argnums=2)(params, tree, alpha))
  scale = np.abs(ref).max()
  assert np.abs(got - ref).max() <= 1e-4 * scale
  assert np.abs(ours(params) - ref).max() > 1e-2 * scale  # the overlay changes the output


def test_init_shapes_match_init_and_trace():
  """`init_shapes` gives `init`'s overlay shapes without a draw, also on abstract parameters (under eval_shape)."""
  params = _toy_params(np.random.default_rng(7))
  tree = lora.init(jax.random.key(0), params, ["attention", "conv"], 3)
  shapes = jax.eval_shape(lambda p: lora.init_shapes(p, ["attention", "conv"], 3), params)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(tree)
  assert all(s.shape == x.shape and s.dtype == x.dtype for s, x in
             zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(tree), strict=True))
  assert lora.overlay_size(params, ["attention", "conv"], 3) == lora.count_params(tree)
