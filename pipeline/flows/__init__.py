"""carve.pipeline.flows: see docs/architecture.md."""
