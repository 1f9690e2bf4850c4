"""carve.pipeline.measure: see docs/architecture.md."""
