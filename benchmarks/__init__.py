"""Benchmarks of euphonium against eager PyTorch and torch.compile (run the scripts; see run_all.py)."""
