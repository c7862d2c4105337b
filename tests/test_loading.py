"""Torch-free weight loading: key naming, layouts, sharded and fp16-variant folders, listing errors."""

import json
import os
import shutil

import diffusers
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from scott_jax.models import loading, unet

KWARGS = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
              attention_head_dim=4, time_cond_proj_dim=8)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**KWARGS).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def folder(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("unet")
  torch_model.save_pretrained(path)
  return path


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _flat(params) -> dict[tuple, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {tuple(k.key for k in path): np.asarray(v) for path, v in leaves}


def test_key_naming():
  key = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"
  path = ("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "kernel")
  assert loading.torch_key_to_flax_path(key, "kernel") == path
  assert loading.flax_path_to_torch_key(path) == key
  assert loading.flax_path_to_torch_key("/".join(path)) == key
  # `linear_1` is a module name, not a list index; `net_2` (FeedForward.net) is an index.
  assert loading.flax_path_to_torch_key(("time_embedding", "linear_1", "bias")) == \
      "time_embedding.linear_1.bias"
  assert loading.flax_to_torch_module("up_blocks_1/attentions_0/transformer_blocks_0/ff/net_2") == \
      "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
  assert loading.torch_module_to_flax("mid_block.resnets.1.conv_shortcut") == ("mid_block", "resnets_1",
                                                                               "conv_shortcut")
  assert loading.flax_path_to_torch_key(("conv_norm_out", "scale")) == "conv_norm_out.weight"


def test_convert_and_back_is_exact(torch_model):
  """Every tensor lands in the Flax tree in Flax layout; `to_state_dict` restores the torch dict exactly."""
  sd = _state(torch_model)
  params = loading.convert_state_dict(sd, unet.abstract_params(unet.UNetConfig.from_diffusers(KWARGS)))
  flat = _flat(params["params"])
  conv = sd["conv_in.weight"]  # (O, I, kh, kw) -> (kh, kw, I, O)
  np.testing.assert_array_equal(flat[("conv_in", "kernel")], conv.transpose(2, 3, 1, 0))
  lin = sd["time_embedding.cond_proj.weight"]  # (out, in) -> (in, out)
  np.testing.assert_array_equal(flat[("time_embedding", "cond_proj", "kernel")], lin.T)
  np.testing.assert_array_equal(flat[("conv_norm_out", "scale")], sd["conv_norm_out.weight"])
  back = loading.to_state_dict(params)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def _broken_folder(src, dst, edit) -> str:
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  sd = load_file(os.path.join(src, WEIGHTS))
  edit(sd)
  save_file(sd, os.path.join(dst, WEIGHTS))
  return dst


MISSING = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.bias"]


@pytest.mark.parametrize("kind", ["missing", "extra", "shape", "all"])
def test_mismatch_lists_every_key(folder, tmp_path, kind):
  def edit(sd):
    if kind in ("missing", "all"):
      for k in MISSING:
        del sd[k]
    if kind in ("extra", "all"):
      sd["mid_block.resnets.0.extra.weight"] = np.zeros((3, 5), np.float32)
    if kind in ("shape", "all"):
      sd["conv_in.weight"] = np.zeros((16, 5, 3, 3), np.float32)
      sd["time_embedding.linear_1.weight"] = np.zeros((64, 15), np.float32)

  with pytest.raises(loading.WeightLoadError) as err:
    loading.load_unet(_broken_folder(folder, tmp_path / "broken", edit))
  msg = str(err.value)
  if kind in ("missing", "all"):
    assert "2 missing" in msg
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel (16, 16)" in msg
    assert f"torch key {MISSING[0]}, torch shape (16, 16)" in msg
    assert "conv_out/bias (4,) (torch key conv_out.bias, torch shape (4,))" in msg
  if kind in ("extra", "all"):
    assert "1 unexpected" in msg and "mid_block.resnets.0.extra.weight (3, 5)" in msg
  if kind in ("shape", "all"):
    assert "2 with the wrong shape" in msg
    assert ("conv_in.weight torch shape (16, 5, 3, 3) -> Flax conv_in/kernel has shape (3, 3, 4, 16) "
            "(torch shape (16, 4, 3, 3) expected)") in msg
    assert ("time_embedding.linear_1.weight torch shape (64, 15) -> Flax time_embedding/linear_1/kernel has "
            "shape (16, 64) (torch shape (64, 16) expected)") in msg
  if kind != "all":
    assert msg.count("\n  ") == {"missing": 2, "extra": 1, "shape": 2}[kind]


def test_sharded_folder(torch_model, folder, tmp_path):
  torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / f"{WEIGHTS}.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2  # really sharded
  assert not (tmp_path / WEIGHTS).exists()
  sharded = loading.read_safetensors_folder(tmp_path)
  single = loading.read_safetensors_folder(folder)
  assert sorted(sharded) == sorted(single)
  for k, v in single.items():
    np.testing.assert_array_equal(sharded[k], v)
  _, params = loading.load_unet(tmp_path)
  assert jax.tree.structure(params) == jax.tree.structure(loading.load_unet(folder)[1])


def test_fp16_variant(torch_model, tmp_path):
  half = diffusers.UNet2DConditionModel(**KWARGS)
  half.load_state_dict(torch_model.state_dict())
  half.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
  assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    loading.read_safetensors_folder(tmp_path)
  _, params = loading.load_unet(tmp_path, variant="fp16")
  flat = _flat(params["params"])
  assert all(v.dtype == np.float32 for v in flat.values())
  ref = _state(half)  # float16 values, upcast exactly
  np.testing.assert_array_equal(flat[("conv_in", "kernel")],
                                ref["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))
  back = loading.to_state_dict(params)
  for k, v in ref.items():
    np.testing.assert_array_equal(back[k], v.astype(np.float32), err_msg=k)


def test_sharded_fp16_variant_and_transformers_name(torch_model, folder, tmp_path):
  half = diffusers.UNet2DConditionModel(**KWARGS)
  half.load_state_dict(torch_model.state_dict())
  half.to(torch.float16).save_pretrained(tmp_path / "a", variant="fp16", max_shard_size="40KB")
  assert (tmp_path / "a" / f"{WEIGHTS}.index.fp16.json").exists()
  sd = loading.read_safetensors_folder(tmp_path / "a", variant="fp16")
  assert sorted(sd) == sorted(_state(half)) and sd["conv_in.weight"].dtype == np.float16
  # transformers' file name `model.safetensors`.
  (tmp_path / "b").mkdir()
  shutil.copy(folder / WEIGHTS, tmp_path / "b" / "model.safetensors")
  assert sorted(loading.read_safetensors_folder(tmp_path / "b")) == sorted(_state(torch_model))


def test_missing_files_name_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    loading.read_safetensors_folder(tmp_path, variant="fp16")
  for name in ("diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors", str(tmp_path),
               "diffusion_pytorch_model.safetensors.index.fp16.json"):
    assert name in str(err.value)
  with pytest.raises(FileNotFoundError, match="config.json"):
    loading.read_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loading.load_unet(tmp_path / "nope")


def test_compute_dtype_is_the_named_jnp_dtype():
  import jax.numpy as jnp

  from scott_jax import choices

  assert {name: loading.compute_dtype(name) for name in choices.DTYPES} == {
      "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  with pytest.raises(ValueError, match="unknown dtype 'int8'; allowed: float32, bfloat16, float16"):
    loading.compute_dtype("int8")
