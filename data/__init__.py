"""Data: manifests, audio I/O, batching, the feature cache and the synthetic-data pipeline."""
