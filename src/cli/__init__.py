"""Entry points other than `python -m src.main`: each composes a job from conf/ and runs it through the same
plan and Runner (evaluate: the standalone scorer; classify_eval: the classifier's precision and recall;
decontaminate: the decontamination counts of a pool; bench_judge: the judging throughput benchmark)."""
