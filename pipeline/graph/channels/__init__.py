"""Channel analysis: which channels of an ONNX graph are coupled, which can be removed, and why not.

    from carve.pipeline.graph.channels import analyse
    analysis = analyse(model)      # units, groups, slices, frozen units with their reasons

The vocabulary is in :mod:`.elements`, the walk's state in :mod:`.state`, one handler per op type in
:mod:`.handlers`, what surgery must fix in :mod:`.fixes`, and the solved result in :mod:`.analysis`.
"""

from carve.pipeline.graph.channels.analysis import ChannelAnalysis, analyse, fingerprint, reason_kind
from carve.pipeline.graph.channels.elements import Chan, Group, Kind, SliceRecord, Source
from carve.pipeline.graph.channels.handlers import HANDLERS

__all__ = [
    "analyse",
    "ChannelAnalysis",
    "Chan",
    "Kind",
    "Source",
    "Group",
    "SliceRecord",
    "HANDLERS",
    "fingerprint",
    "reason_kind",
]
