"""Fine-tuning's augmentation lives with the data (:mod:`carve.pipeline.data.augment`, so the zoo's training tools use
it too); this name stays for the code that imports it from here."""

from carve.pipeline.data.augment import Augment

__all__ = ["Augment"]
