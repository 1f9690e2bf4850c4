"""Run an ONNX graph with PyTorch: an ``nn.Module`` whose parameters are the ONNX initializers, executed as a
*recorded program* that is graph-safe by construction.

:class:`TorchGraph` is built from a :class:`~carve.pipeline.graph.Model`:

* floating-point initializers become ``nn.Parameter``s, so gradients flow to them (loss-based criteria, fine-tuning)
  and :meth:`TorchGraph.write_back` copies trained values into the very same ONNX initializers; integer initializers,
  and float initializers read only as arguments (a Pad value, Resize scales, Clip bounds), stay host values;
* running it records a **program** for the input shapes at hand: every node's builder
  (:mod:`carve.pipeline.runtime.torch_ops`) resolves pads, pad values, resize sizes, reshape targets, slice bounds,
  split sizes, ranges, constant-of-shape and the whole ``Shape -> Gather -> Concat -> Reshape`` arithmetic into Python
  values once, turns host constants that meet device tensors into device tensors once, and leaves a list of kernels that
  take tensors only. Replaying the program performs no host read, no ``.item()``, no ``.cpu()`` and no host-to-device
  copy, and frees each intermediate after its last use. Static builds also run ``Mul(x, Sigmoid(x))`` (exported SiLU) as
  one ``F.silu`` kernel, as PyTorch itself does.

Two ways to use it, side by side:

* **dynamic** — ``graph(x)`` (and ``graph(x, capture=[names])``, which also returns intermediate tensors): a program per
  input signature (shapes, dtypes, device) is recorded on first use and replayed after, so a training loop with a last,
  smaller batch simply gets a second program. Gradients, the criteria and fine-tuning use this. ``batch_statistics =
  True`` makes BatchNormalization normalise with batch statistics and update its running statistics (training mode).
* **static** — ``graph.static(x)`` (or a shape) returns a :class:`StaticGraph` for exactly that input: the module
  engines capture in CUDA graphs and ``torch.compile(..., fullgraph=True)`` traces without a graph break.

What cannot be made static: a value that shapes the computation but is computed *from the input data* (a reshape target
taken from activations, a data-decided ``Range``/``ConstantOfShape``/``Expand``/``Tile``/``Slice``/``Pad``/``Resize``
argument). ``static()`` refuses such a graph with a :class:`~carve.pipeline.runtime.torch_ops.DataDependent` error
naming the node and the tensor; the dynamic mode still runs it by reading that value back each call (and never replays
it). Input shapes themselves are static per program: another shape is another recording (dynamic) or another
``static()`` build.

It is the engine of the ``torch-cuda`` backend and runs on the CPU as well, where tests compare it with ONNX Runtime.
An unsupported op raises a :class:`CarveError` naming the node and the supported ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.runtime.torch_ops import ARGS, DTYPES, OPS, Const, DataDependent, Folded, In, Kernel, Node

__all__ = ["TorchGraph", "StaticGraph", "Program", "DataDependent", "OPS"]


def _is_float(t: onnx.TensorProto) -> bool:
    return t.data_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )


def _safe(name: str) -> str:
    return "p_" + "".join(ch if ch.isalnum() else "_" for ch in name)


class TorchGraph(nn.Module):
    """An ONNX model as a PyTorch module (see the module docstring)."""

    max_programs = 8  # dynamic mode keeps this many recorded input signatures (oldest dropped first)

    def __init__(self, model: Model, *, trainable: bool = True) -> None:
        super().__init__()
        self.opset = model.opset
        self.input_names = list(model.input_names)
        self.output_names = list(model.output_names)
        unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in OPS})
        if unsupported:
            node = next(n for n in model.graph.node if n.op_type == unsupported[0])
            raise CarveError(
                f"the PyTorch runner does not support op {unsupported[0]} (node {node.name!r})",
                hint=f"supported ops: {', '.join(sorted(OPS))}",
            )
        self.nodes = [Node(n) for n in model.graph.node]
        self.uses: dict[str, int] = {}  # how many node inputs read each tensor (graph outputs count as one more)
        for n in self.nodes:
            for i in n.inputs:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in self.output_names:
            self.uses[o] = self.uses.get(o, 0) + 1
        inits = {t.name for t in model.graph.initializer}
        self.input_types = [
            DTYPES.get(i.type.tensor_type.elem_type, torch.float32) for i in model.graph.input if i.name not in inits
        ]
        self.params = nn.ParameterDict()
        self.param_of: dict[str, str] = {}
        self.consts: dict[str, np.ndarray] = {}  # host values: integer initializers, argument-only float initializers
        self.arg_values: dict[str, np.ndarray] = {}  # float parameters that are also read as host arguments
        data_uses: set[str] = set()
        arg_uses: set[str] = set()
        for n in model.graph.node:
            args = ARGS.get(n.op_type, ())
            for i, name in enumerate(n.input):
                (arg_uses if i in args else data_uses).add(name)
        # running statistics are not learned (and torch's batch_norm refuses gradients for them)
        statistics = {i for n in model.graph.node if n.op_type == "BatchNormalization" for i in n.input[3:5]}
        for t in model.graph.initializer:
            if t.name not in data_uses and t.name not in arg_uses:
                continue
            arr = numpy_helper.to_array(t)
            if _is_float(t) and t.name in data_uses:
                key = _safe(t.name)
                while key in self.params:  # "a.b" and "a_b" would share a key
                    key += "_"
                grad = trainable and t.name not in statistics
                self.params[key] = nn.Parameter(torch.from_numpy(np.array(arr)), requires_grad=grad)
                self.param_of[t.name] = key
                if t.name in arg_uses:
                    self.arg_values[t.name] = np.array(arr)
            else:
                self.consts[t.name] = np.array(arr)
        self.onnx_float = next((p.dtype for p in self.params.values() if p.is_floating_point()), torch.float32)
        self.batch_statistics = False
        self._programs: dict[tuple, Program] = {}

    # -- what the builders ask of the graph ------------------------------------------------------------------------
    def float_dtype(self) -> torch.dtype:
        """The floating-point dtype the parameters have now (after ``.to(dtype)``, the converted one)."""
        return next((p.dtype for p in self.params.values() if p.is_floating_point()), self.onnx_float)

    def device(self) -> torch.device:
        return next((p.device for p in self.params.values()), torch.device("cpu"))

    def cast_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """A Cast's target: casts to the model's own float type follow a conversion of the module (``.half()``)."""
        now = self.float_dtype()
        return now if dtype == self.onnx_float and now != self.onnx_float else dtype

    def _apply(self, fn, *args, **kwargs):
        self._programs.clear()  # recorded constants live on the old device / in the old dtype
        return super()._apply(fn, *args, **kwargs)

    # -- running ---------------------------------------------------------------------------------------------------
    def _inputs(self, args: Sequence[torch.Tensor], feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        values = dict(zip(self.input_names, args))
        values.update(feeds)
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise CarveError(f"missing input {missing[0]!r}; the model takes {self.input_names}")
        return [values[n] for n in self.input_names]

    def forward(self, *args: torch.Tensor, capture: Sequence[str] = (), **feeds: torch.Tensor):
        """Dynamic mode: replay the program recorded for this input signature, recording it on first use."""
        inputs = self._inputs(args, feeds)
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        program = self._programs.get(key)
        if program is None:
            program, result, env = _Recorder(self, static=False).record(inputs)
            if program.replayable:
                while len(self._programs) >= self.max_programs:
                    self._programs.pop(next(iter(self._programs)))
                self._programs[key] = program
            captured = program.pick(env, capture) if capture else None
        else:
            result, captured = program.run(self, inputs, capture)
        out = result[0] if len(result) == 1 else result
        return (out, captured) if capture else out

    def static(self, *example: torch.Tensor | Sequence[int], **named: torch.Tensor) -> StaticGraph:
        """A :class:`StaticGraph` for exactly these inputs: example tensors, or shapes (zeros on the parameters' device
        and dtype). Refuses a graph with data-dependent shapes (:class:`DataDependent`). Build it after moving the
        module (``.to(device, dtype, memory_format)``): the recorded constants live where the parameters were."""
        tensors = []
        for i, v in enumerate(example):
            if isinstance(v, torch.Tensor):
                tensors.append(v)
            else:
                dtype = self.input_types[i] if i < len(self.input_types) else torch.float32
                dtype = self.cast_dtype(dtype) if dtype.is_floating_point else dtype
                tensors.append(torch.zeros(tuple(int(d) for d in v), dtype=dtype, device=self.device()))
        inputs = self._inputs(tensors, named)
        with torch.no_grad():
            program, _, _ = _Recorder(self, static=True).record(inputs)
        return StaticGraph(self, program, [tuple(t.shape) for t in inputs])

    def parameter(self, initializer: str) -> nn.Parameter:
        return self.params[self.param_of[initializer]]

    def write_back(self, model: Model, only=None) -> None:
        """Copy the (trained) parameters into the model's initializers of the same names (``only``: just these)."""
        with torch.no_grad():
            for name, key in self.param_of.items():
                if name in model.init and (only is None or name in only):
                    model.set_array(
                        name, self.params[key].detach().float().cpu().numpy().astype(model.array(name).dtype)
                    )


class StaticGraph(nn.Module):
    """A :class:`TorchGraph`'s program for one input signature: nothing but kernels on tensors (see the module doc).
    Parameters are read from the graph at every call, so in-place updates are seen; moving it is refused (build a new
    one after moving the graph)."""

    def __init__(self, graph: TorchGraph, program: Program, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.graph = graph
        self.program = program
        self.input_shapes = shapes

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_shapes) or any(tuple(t.shape) != s for t, s in zip(inputs, self.input_shapes)):
            got = [tuple(t.shape) for t in inputs]
            raise CarveError(f"this static graph was built for inputs {self.input_shapes}, got {got}")
        result, _ = self.program.run(self.graph, inputs)
        return result[0] if len(result) == 1 else result

    def _apply(self, fn, *args, **kwargs):
        raise CarveError("a StaticGraph cannot be moved: move the TorchGraph, then call .static() again")


class Step(NamedTuple):
    """One recorded node: its kernel, the slots it reads and writes, whether it returns one tensor, and the node it
    comes from (name and op type)."""

    fn: Callable
    ins: list[int]
    outs: list[int]
    single: bool
    name: str
    op: str


class Replay(NamedTuple):
    """One step of a :class:`Program`: a :class:`Step` with the slots it is the last reader of (freed after it)."""

    fn: Callable
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    dead: tuple[int, ...]
    single: bool
    name: str


class Program:
    """Recorded kernels and the slots they read and write. ``template`` holds the constants (device tensors made once
    at recording) and ``None`` elsewhere; ``steps`` are :class:`Replay` tuples."""

    def __init__(
        self,
        steps: list[Replay],
        template: list[Any],
        input_slots: list[int],
        param_slots: list[tuple[int, str]],
        output_slots: list[int],
        names: dict[str, int],
        host: dict[str, np.ndarray],
        why_dynamic: str | None,
    ) -> None:
        self.steps, self.template = steps, template
        self.input_slots, self.param_slots, self.output_slots = input_slots, param_slots, output_slots
        self.names, self.host, self.why_dynamic = names, host, why_dynamic
        self.node_names = [s.name for s in steps]

    @property
    def replayable(self) -> bool:
        return self.why_dynamic is None

    def run(self, graph: TorchGraph, inputs: Sequence[torch.Tensor], capture: Sequence[str] = ()):
        env = list(self.template)
        for s, t in zip(self.input_slots, inputs):
            env[s] = t
        params = graph.params._parameters  # the dict behind ParameterDict: ~100x faster than its __getitem__
        for s, key in self.param_slots:
            env[s] = params[key]
        keep = bool(capture)
        k = 0
        try:
            for fn, ins, outs, dead, single, _ in self.steps:
                r = fn(*[env[i] for i in ins])
                if single:
                    env[outs[0]] = r
                else:
                    for o, v in zip(outs, r):
                        env[o] = v
                if not keep:
                    for d in dead:
                        env[d] = None
                k += 1
        except CarveError:
            raise
        except Exception as exc:
            raise RuntimeError(f"node {self.node_names[k]}: {exc}") from exc
        result = tuple(env[s] for s in self.output_slots)
        return result, (self.pick(env, capture) if capture else None)

    def pick(self, env: Sequence[Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for c in names:
            if c in self.names:
                out[c] = env[self.names[c]]
            elif c in self.host:
                out[c] = torch.from_numpy(np.array(self.host[c]))
            else:
                raise CarveError(f"capture: the graph has no tensor named {c!r}")
        return out


class _Recorder:
    """One recording pass: runs every node's builder and kernel on real tensors, keeps host values on the host, and
    writes the :class:`Program` that replays the kernels."""

    def __init__(self, graph: TorchGraph, *, static: bool) -> None:
        self.g, self.static = graph, static
        self.why_dynamic: str | None = None
        self.values: list[Any] = [None, None]  # slot 0: an absent input; slot 1: outputs nobody named
        self.consts: set[int] = set()
        self.host: dict[str, np.ndarray] = dict(graph.consts)
        self.dev: dict[str, tuple[torch.Tensor, int]] = {}
        self.made: dict[tuple, int] = {}
        self.steps: list[Step | None] = []
        self.producer: dict[str, int] = {}  # tensor -> index of the step that computes it

    # -- what builders call ----------------------------------------------------------------------------------------
    def read(self, inp: In, what: str) -> np.ndarray:
        n = inp.node
        if self.static:
            raise DataDependent(
                f"{n.op} {n.name!r}: its {what} is tensor {inp.name!r}, computed from the input data at run time (a "
                "data-dependent shape): it cannot be fixed when the graph is built, so this model cannot be captured "
                "in a CUDA graph or compiled as one static graph",
                hint="run it in dynamic mode (carve's torch-cuda engine falls back to that without CUDA graphs), or "
                "export the model with that value constant",
            )
        self.why_dynamic = f"{n.op} {n.name!r} reads its {what} ({inp.name!r}) from the data"
        return inp.tensor.detach().cpu().numpy()

    # -- slots -----------------------------------------------------------------------------------------------------
    def slot(self, value: Any) -> int:
        self.values.append(value)
        return len(self.values) - 1

    def constant(self, arr: np.ndarray, key: Any, device: torch.device, dtype: torch.dtype | None) -> int:
        """A host value as a device tensor, made once per (value, device, dtype)."""
        t = torch.from_numpy(np.array(arr))
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        ck = (key if key is not None else id(arr), device, t.dtype)
        if ck not in self.made:
            s = self.slot(t.to(device))
            self.consts.add(s)
            self.made[ck] = s
        return self.made[ck]

    # -- the pass --------------------------------------------------------------------------------------------------
    def record(self, inputs: Sequence[torch.Tensor]):
        g = self.g
        input_slots = []
        for name, t in zip(g.input_names, inputs):
            s = self.slot(t)
            self.dev[name] = (t, s)
            input_slots.append(s)
        param_slots = []
        for name, key in g.param_of.items():
            s = self.slot(g.params[key])
            self.dev[name] = (g.params[key], s)
            param_slots.append((s, key))
        for node in g.nodes:
            self.node(node)
        device = inputs[0].device if inputs else g.device()
        output_slots = []
        for name in g.output_names:
            if name in self.dev:
                output_slots.append(self.dev[name][1])
            elif name in self.host:
                output_slots.append(self.constant(self.host[name], name, device, None))
            else:
                raise CarveError(f"graph output {name!r} is not produced by any node")
        result = tuple(self.values[s] for s in output_slots)
        env = self.values
        program = self.program(input_slots, param_slots, output_slots)
        return program, result, env

    def program(self, input_slots, param_slots, output_slots) -> Program:
        self.steps = [s for s in self.steps if s is not None]  # steps a fusion replaced
        last: dict[int, int] = {}
        for k, step in enumerate(self.steps):
            for s in step.ins:
                last[s] = k
            for s in step.outs:
                last.setdefault(s, k)  # produced and never read: dead right away
        keep = set(output_slots) | self.consts | {s for s, _ in param_slots} | {0, 1}
        dead: list[list[int]] = [[] for _ in self.steps]
        for s, k in last.items():
            if s not in keep:
                dead[k].append(s)
        steps = [
            Replay(st.fn, tuple(st.ins), tuple(st.outs), tuple(dead[k]), st.single, st.name)
            for k, st in enumerate(self.steps)
        ]
        template = [v if i in self.consts else None for i, v in enumerate(self.values)]
        names = {name: s for name, (_, s) in self.dev.items()}
        return Program(steps, template, input_slots, param_slots, output_slots, names, self.host, self.why_dynamic)

    def fuse_silu(self, n: Node) -> bool:
        """Static builds: ``Mul(x, Sigmoid(x))`` (how SiLU is exported) as one ``F.silu`` kernel, as PyTorch runs it,
        when nothing else reads the sigmoid. Dynamic mode keeps every node (its tensors can be captured)."""
        if not self.static or n.op != "Mul" or len(n.inputs) != 2:
            return False
        for x, s in (n.inputs, n.inputs[::-1]):
            k = self.producer.get(s)
            step = self.steps[k] if k is not None else None
            if step is None or step.op != "Sigmoid" or self.g.uses.get(s) != 1 or x not in self.dev:
                continue
            if step.ins != [self.dev[x][1]]:
                continue
            self.steps[k] = None
            out = F.silu(self.dev[x][0])
            slot = self.slot(out)
            self.dev[n.outputs[0]] = (out, slot)
            self.steps.append(Step(F.silu, [self.dev[x][1]], [slot], True, n.name, "SiLU"))
            self.producer[n.outputs[0]] = len(self.steps) - 1
            return True
        return False

    def node(self, n: Node) -> None:
        if self.fuse_silu(n):
            return
        ins = self.node_inputs(n)
        try:
            built = OPS[n.op](self.g, n, ins)
            if isinstance(built, Folded):
                self.set_host(n, built.values)
                return
            if not isinstance(built, Kernel):
                built = Kernel(built, range(len(ins)))
            ops = built.operands
            dev_ops = [
                ins[o].tensor for o in ops if not isinstance(o, Const) and o < len(ins) and ins[o].tensor is not None
            ]
            if not dev_ops:  # everything known on the host: fold it now
                with torch.no_grad():
                    vals = built.fn(*[self.host_tensor(o, ins) for o in ops])
                vals = vals if isinstance(vals, (list, tuple)) else [vals]
                self.set_host(n, [v.detach().cpu().numpy() for v in vals])
                return
            in_slots = self.operand_slots(ops, ins, dev_ops)
            out = built.fn(*[self.values[s] for s in in_slots])
        except CarveError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{n.op} {n.name!r}: {exc}") from exc
        self.add_step(n, built.fn, in_slots, out)

    def node_inputs(self, n: Node) -> list[In]:
        """The node's inputs as its builder sees them: host values (arguments, folded constants) or device tensors."""
        g, args, ins = self.g, ARGS[n.op], []
        for i, name in enumerate(n.inputs):
            host, tensor = None, None
            if not name:
                pass
            elif i in args and name in g.arg_values:
                host = g.arg_values[name]
            elif name in self.host:
                host = self.host[name]
            elif name in self.dev:
                tensor = self.dev[name][0]
            else:
                raise CarveError(f"{n.op} {n.name!r}: input {name!r} is not produced by any node or initializer")
            ins.append(In(n, name, host, tensor, self.read))
        return ins

    def operand_slots(self, ops, ins: list[In], dev_ops: list[torch.Tensor]) -> list[int]:
        """The slot of each kernel operand: device tensors where they are, host values and constants made into
        device constants (once) on the device and in the float type of the device operands."""
        device = dev_ops[0].device
        fdtype = next((t.dtype for t in dev_ops if t.is_floating_point()), None)
        in_slots = []
        for o in ops:
            if isinstance(o, Const):
                in_slots.append(self.constant(o.value, None, device, fdtype))
            elif o >= len(ins) or not ins[o].present:
                in_slots.append(0)
            elif ins[o].tensor is not None:
                in_slots.append(self.dev[ins[o].name][1])
            else:
                in_slots.append(self.constant(ins[o].host, ins[o].name, device, fdtype))
        return in_slots

    def add_step(self, n: Node, fn: Callable, in_slots: list[int], out: Any) -> None:
        """Keep the kernel's outputs in slots (unnamed ones in slot 1) and append its :class:`Step`."""
        single = not isinstance(out, (list, tuple))
        outs = [out] if single else list(out)
        out_slots = []
        for name, v in zip(n.outputs, outs):
            if name:
                s = self.slot(v)
                self.dev[name] = (v, s)
                out_slots.append(s)
            else:
                out_slots.append(1)
        if not single and len(out_slots) < len(outs):
            out_slots += [1] * (len(outs) - len(out_slots))
        self.steps.append(Step(fn, in_slots, out_slots, single, n.name, n.op))
        for name in n.outputs:
            if name:
                self.producer[name] = len(self.steps) - 1

    def host_tensor(self, o: int | Const, ins: list[In]) -> torch.Tensor | None:
        if isinstance(o, Const):
            return torch.from_numpy(np.array(o.value))
        if o >= len(ins) or not ins[o].present:
            return None
        return torch.from_numpy(np.array(ins[o].host))

    def set_host(self, n: Node, values: Sequence[np.ndarray]) -> None:
        for name, v in zip(n.outputs, values):
            if name:
                self.host[name] = np.asarray(v)
