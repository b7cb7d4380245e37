"""Evaluation: judges (LLM rubric, oracle for the toy world), benchmark loaders, the eval runner."""
