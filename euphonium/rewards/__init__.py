"""Outcome rewards on decoded videos and process reward models on noisy latents."""
