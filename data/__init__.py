"""Data: manifests, audio I/O, batching, the synthetic-data pipeline and the toy meetings world."""
