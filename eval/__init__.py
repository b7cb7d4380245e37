"""Evaluation: judges (LLM rubric; the toy world's oracle by name), DPO preference pairs, benchmark
loaders (jsonl, AMI, FLORAS), the evaluation runner (docs/evaluation.md, docs/benchmarks.md)."""
