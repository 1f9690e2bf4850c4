"""carve.pipeline.runtime: see docs/architecture.md."""
