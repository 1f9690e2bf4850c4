"""carve.pipeline.data: see docs/architecture.md."""
