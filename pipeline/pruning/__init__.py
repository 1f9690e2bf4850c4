"""carve.pipeline.pruning: see docs/architecture.md."""
