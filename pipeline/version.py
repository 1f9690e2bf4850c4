"""carve's version, in one place (the package, reports and model metadata read it from here)."""

__version__ = "0.1.0"
