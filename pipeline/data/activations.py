"""Which tensor holds a producer's activations, and capturing them for activation-based criteria.

A producer's *pre-activation* tensor is its own output; its *post-activation* tensor is what the next layer sees: the
output is followed through the chain of per-channel ops that only it feeds (BatchNormalization, Relu, Clip, HardSwish,
SiLU's ``Mul(x, Sigmoid(x))``, ...) while the channels stay exactly the producer's. A residual ``Add`` or a ``Concat``
ends the chain. Criteria record which one they read (``tensor_kind``) so reports can say it.
"""

from __future__ import annotations

from carve.pipeline.graph.channels import ChannelAnalysis, Source

PER_CHANNEL = {
    "BatchNormalization",
    "InstanceNormalization",
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Gelu",
    "Softplus",
    "Mish",
    "Dropout",
    "Identity",
}


def activation_tensor(analysis: ChannelAnalysis, source: Source, *, post: bool = True) -> str:
    """The tensor whose channel i is the activation of ``source``'s channel i (pre- or post-activation)."""
    model = analysis.model
    tensor = model.nodes[source.name].output[0]
    if not post:
        return tensor
    while True:
        users = model.consumers.get(tensor, [])
        nxt = None
        if len(users) == 1 and users[0].op_type in PER_CHANNEL and users[0].input[0] == tensor:
            nxt = users[0].output[0]
        elif len(users) == 2 and {u.op_type for u in users} == {"Sigmoid", "Mul"}:
            sig = next(u for u in users if u.op_type == "Sigmoid")
            mul = next(u for u in users if u.op_type == "Mul")
            if set(mul.input) == {tensor, sig.output[0]}:  # SiLU / Swish
                nxt = mul.output[0]
        if nxt is None or tensor in model.output_names:
            return tensor
        tensor = nxt


def spatial_producers(analysis: ChannelAnalysis) -> list[Source]:
    """Producers whose output is a 4-D feature map (activation criteria score these; others are left unscored)."""
    out = []
    for s in analysis.producers():
        shp = analysis.model.shape(analysis.model.nodes[s.name].output[0])
        if shp is not None and len(shp) == 4:
            out.append(s)
    return out
