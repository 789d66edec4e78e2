"""Benchmarks against Stable-Baselines3 (see README.md in this folder)."""
