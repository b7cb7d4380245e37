"""Evaluation: judges (LLM rubric; the toy world's oracle by name), DPO preference pairs, benchmark loaders, the eval runner."""
