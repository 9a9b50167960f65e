"""Benchmarks of fedrot_ext.align_and_aggregate against pure-PyTorch baselines (see RESULTS.md)."""
