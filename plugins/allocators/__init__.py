"""Built-in allocators: how many units each slice of each group loses."""

from . import uniform  # noqa: F401
