"""Benchmarks for the pairwise judge: RewardBench and MT-Bench human judgments (loading, slicing, official
scoring), and a bridge from lm-eval's per-sample output to the same metrics."""

# Each benchmark's headline: the number the loop logs first and the report compares, the judgment text read by the
# benchmark's official rule (synthetic: the held-out pairs of the run's own data). Declared here only.
HEADLINE_METRIC = {"synthetic": "synthetic/accuracy", "rewardbench": "rewardbench/overall", "mtbench": "mtbench/agreement_s1"}
