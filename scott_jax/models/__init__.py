"""Flax Stable Diffusion model family: U-Net, VAE, CLIP text encoder, LoRA, loaders."""
