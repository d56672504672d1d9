"""Benchmarks for the pairwise judge: RewardBench and MT-Bench human judgments (loading, slicing, official
scoring), and a bridge from lm-eval's per-sample output to the same metrics."""
