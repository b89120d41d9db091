"""Benchmarks: the accuracy grid and the baseline methods it compares."""
