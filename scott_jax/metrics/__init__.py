"""Evaluation metrics: FID, CLIP score, coverage."""
