"""Low-rank decomposition of convolutions and linear layers: a k x k conv becomes a basis conv (rank r) and a 1x1
coefficient conv; a MatMul or Gemm with a constant weight (a transformer's MLP and projections, a classifier) becomes a
basis MatMul/Gemm to r features and a coefficient MatMul/Gemm back.

Efficient Decomposition and Pruning (EDP, IEEE TNNLS 32(10):4499-4513, 2021, doi 10.1109/TNNLS.2020.3018177) replaces
a layer by a compressed-aware block of a basis layer and a coefficient layer and trains it; carve applies the block
post-training (papers.md section 2):

* BN is folded first, then M = W.reshape(Cout, Cin k^2) = U S V^T;
* basis B = S_r^1/2 V_r^T: r x Cin x k x k, with the original stride, padding and dilation;
  coefficient A = U_r S_r^1/2: a Cout x r 1x1 conv, which carries the bias;
* the rank comes from the spectrum: the smallest r keeping an ``energy`` fraction of sum s_i^2; or, with calibration
  data, from a relative output ``error``: the SVD is taken of M L, where L L^T is the covariance of the layer's input
  patches on the calibration set, so the discarded tail is exactly the output error on that data (data-aware SVD;
  B = S_r^1/2 V_r^T L^-1); or by bisection of a common energy level to meet a global ``target_macs`` fraction;
* a layer is left alone when its rank would not beat the break-even r < Cout Cin k^2 / (Cin k^2 + Cout) (the pair
  would cost more MACs than the conv), and the pass says so. Ranks round up to ``round_to``;
* a linear layer y = x W (+ c) is the k = 1 case with M = W^T (alpha folded in): basis weight (S_r^1/2 V_r^T)^T, K x r,
  coefficient weight (U_r S_r^1/2)^T, r x N, which keeps the Gemm's C and beta; its "patches" are the input rows.
  ``kernels`` picks the layers: ``all`` (convs and linear layers), ``conv``, ``spatial`` (k x k convs with k > 1),
  ``linear`` (MatMul/Gemm only).

The rank-r channels between the two layers are ordinary channels to the channel analysis: ``carve prune`` can remove
them (criterion ``edp`` scores them by coefficient norms), and ``merge`` multiplies the pair back (W' = A B).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from carve.pipeline.data.im2col import patches
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import Model, attr
from carve.pipeline.graph.fold import fold_batchnorms
from carve.pipeline.graph.precision import refuse_quantized
from carve.pipeline.graph.rewrite import finish, replace_nodes
from carve.pipeline.passes import Pass, PassContext, PassResult, passes

KERNELS = ("all", "conv", "spatial", "linear")
LINEAR = ("MatMul", "Gemm")


@dataclass
class Layer:
    node: onnx.NodeProto
    w: np.ndarray  # Cout x Cin x k x k (float64); a linear layer's M = W^T: N x K
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    l_inv: np.ndarray | None  # data-aware: inverse Cholesky factor of the patch covariance
    hw: int  # output positions (MACs per rank unit scale with it)

    @property
    def cout(self) -> int:
        return self.w.shape[0]

    @property
    def d(self) -> int:
        return int(np.prod(self.w.shape[1:]))

    def break_even(self) -> float:
        return self.cout * self.d / (self.d + self.cout)

    def energy(self) -> np.ndarray:
        e = np.cumsum(self.s**2)
        return e / e[-1] if e[-1] > 0 else np.ones_like(e)

    def rank_for_energy(self, eta: float, round_to: int) -> int:
        r = int(np.searchsorted(self.energy(), eta - 1e-12) + 1)
        return min(len(self.s), math.ceil(r / round_to) * round_to)

    def macs(self, r: int | None) -> int:
        if r is None:
            return self.cout * self.d * self.hw
        return (r * self.d + self.cout * r) * self.hw


def _linear(model: Model, n: onnx.NodeProto) -> bool:
    """A MatMul of an activation by a constant 2-D weight, or a Gemm with a constant B that reads A as it is."""
    if n.op_type not in LINEAR or len(n.input) < 2 or not model.is_const(n.input[1]) or model.is_const(n.input[0]):
        return False
    w = model.shape(n.input[1])
    return w is not None and len(w) == 2 and not (n.op_type == "Gemm" and attr(n, "transA", 0))


def _candidates(model: Model, include: list[str], exclude: list[str], kernels: str) -> list[onnx.NodeProto]:
    out = []
    for n in model.graph.node:
        if n.name.endswith(("_basis", "_coeff")):
            continue
        if n.op_type in LINEAR:
            if kernels not in ("all", "linear") or not _linear(model, n):
                continue
        else:
            if kernels == "linear" or n.op_type != "Conv" or int(attr(n, "group", 1)) != 1:
                continue
            w = model.shape(n.input[1]) if model.is_const(n.input[1]) else None
            if w is None or len(w) != 4 or (kernels == "spatial" and w[2:] == (1, 1)):
                continue
        if include and not any(fnmatch.fnmatchcase(n.name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(n.name, p) for p in exclude):
            continue
        out.append(n)
    return out


def _patch_covariances(model: Model, nodes: list[onnx.NodeProto], data, budget_bytes: int = 512 << 20):
    """E[p p^T] of every node's input patches over the calibration data, a few layers per pass to bound memory."""
    from carve.pipeline.data.capture import capture

    covs: dict[str, np.ndarray] = {}
    chunk: list[onnx.NodeProto] = []
    size = 0

    class _Gram:
        def __init__(self, group: list[onnx.NodeProto]) -> None:
            self.group = group
            self.sum = {n.name: 0.0 for n in group}
            self.count = {n.name: 0 for n in group}

        def update_batch(self, values, labels) -> None:
            for n in self.group:
                x = values[n.input[0]]
                p = patches(model, n, x) if n.op_type == "Conv" else x.reshape(-1, x.shape[-1])
                p = p.astype(np.float64)
                self.sum[n.name] = self.sum[n.name] + p.T @ p
                self.count[n.name] += len(p)

    def flush() -> None:
        if not chunk:
            return
        g = _Gram(list(chunk))
        capture(model, sorted({n.input[0] for n in chunk}), data, g)
        for n in chunk:
            covs[n.name] = g.sum[n.name] / max(g.count[n.name], 1)
        chunk.clear()

    for n in nodes:
        w = model.shape(n.input[1])
        d = int(np.prod(w[1:])) if n.op_type == "Conv" else int(w[0] if n.op_type == "MatMul" else _k(n, w))
        if size + d * d * 8 > budget_bytes:
            flush()
            size = 0
        chunk.append(n)
        size += d * d * 8
    flush()
    return covs


def _k(n: onnx.NodeProto, w) -> int:
    """A Gemm's input features: B is K x N, or N x K with transB."""
    return int(w[1] if attr(n, "transB", 0) else w[0])


def linear_matrix(model: Model, n: onnx.NodeProto) -> np.ndarray:
    """M = W^T (N x K) of a linear layer y = x W, the Gemm's alpha folded in."""
    w = model.array(n.input[1]).astype(np.float64)
    if n.op_type == "MatMul":
        return w.T
    w = w * float(attr(n, "alpha", 1.0))
    return w if attr(n, "transB", 0) else w.T


def analyse_layers(model: Model, nodes: list[onnx.NodeProto], data=None) -> list[Layer]:
    covs = _patch_covariances(model, nodes, data) if data is not None else {}
    layers = []
    for n in nodes:
        w = model.array(n.input[1]).astype(np.float64) if n.op_type == "Conv" else linear_matrix(model, n)
        m = w.reshape(w.shape[0], -1)
        l_inv = None
        if n.name in covs:
            cov = covs[n.name]
            ridge = 1e-6 * max(float(np.trace(cov)) / len(cov), 1e-12)
            lc = np.linalg.cholesky(cov + ridge * np.eye(len(cov)))
            l_inv = np.linalg.inv(lc)
            m = m @ lc
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        out = model.shape(n.output[0])
        positions = (out[2:] if n.op_type == "Conv" else out[1:-1]) if out else ()
        hw = int(np.prod([d or 1 for d in positions]))
        layers.append(Layer(n, w, u, s, vt, l_inv, hw))
    return layers


def factors(layer: Layer, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(basis r x Cin x k x k, coefficient Cout x r x 1 x 1)."""
    root = np.sqrt(layer.s[:r])
    b = root[:, None] * layer.vt[:r]
    if layer.l_inv is not None:
        b = b @ layer.l_inv
    a = layer.u[:, :r] * root[None, :]
    return b.reshape(r, *layer.w.shape[1:]), a.reshape(layer.cout, r, 1, 1)


@passes.register("decompose")
class Decompose(Pass):
    description = "split convs and MatMul/Gemm layers into a rank-r basis and a coefficient layer (EDP)"
    # per-layer energy compounds over depth: 0.95 per layer left CIFAR ResNet-20 at cosine 0.85 (issue 25)
    warn_below_cosine = 0.95
    low_cosine_hint = "keep more (a higher `energy`, or an `error` bound on `calib` data), or repair / fine-tune"

    def __init__(
        self,
        energy: float | None = None,
        error: float | None = None,
        target_macs: float | None = None,
        round_to: int = 1,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        kernels: str = "all",
        break_even: bool = True,
    ) -> None:
        chosen = [x for x in (energy, error, target_macs) if x is not None]
        if len(chosen) > 1:
            raise CarveError("decompose: give one of `energy`, `error`, `target_macs`")
        if energy is None and error is None and target_macs is None:
            energy = 0.95
        for name, v in (("energy", energy), ("target_macs", target_macs)):
            if v is not None and not 0 < v <= 1:
                raise CarveError(f"decompose: {name} must be in (0, 1], got {v}")
        if error is not None and not 0 <= error < 1:
            raise CarveError(f"decompose: error must be in [0, 1), got {error}")
        if kernels not in KERNELS:
            raise CarveError(f"decompose: kernels must be one of {', '.join(KERNELS)}; got {kernels!r}")
        self.energy, self.error, self.target_macs = energy, error, target_macs
        self.round_to, self.include, self.exclude = round_to, include or [], exclude or []
        self.kernels, self.break_even = kernels, break_even

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"calib"}) if self.error is not None else frozenset()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        refuse_quantized(model, "decompose")
        m, n_folded, _ = fold_batchnorms(model)
        nodes = _candidates(m, self.include, self.exclude, self.kernels)
        if not nodes:
            return PassResult(
                m, n_folded > 0, ["no group-1 convolution or linear layer to decompose"], {"decomposed": 0}
            )
        layers = analyse_layers(m, nodes, ctx.calib)
        ranks = self.choose_ranks(m, layers)
        details, done = [], 0
        macs_before = sum(lay.macs(None) for lay in layers)
        macs_after = 0
        for lay in layers:
            r, why = ranks[lay.node.name]
            if r is None:
                details.append(f"{lay.node.name}: kept ({why})")
                macs_after += lay.macs(None)
                continue
            self.split(m, lay, r)
            done += 1
            macs_after += lay.macs(r)
            details.append(f"{lay.node.name}: rank {r} of {min(lay.cout, lay.d)} ({why})")
        finish(m)
        summary = {
            "decomposed": done,
            "layers": len(layers),
            "macs_layers_before": macs_before,
            "macs_layers_after": macs_after,
            "data_aware": ctx.calib is not None,
        }
        return PassResult(m, done > 0 or n_folded > 0, details, summary)

    def rank(self, lay: Layer, eta: float) -> tuple[int | None, str]:
        r = lay.rank_for_energy(eta, self.round_to)
        if self.break_even and r >= lay.break_even():
            return None, f"rank {r} for {self.describe(eta)} is not below the break-even {lay.break_even():.1f}"
        return r, self.describe(eta)

    def describe(self, eta: float) -> str:
        if self.error is not None:
            return f"relative output error {math.sqrt(max(0.0, 1 - eta)):.3g} on calibration data"
        return f"energy {eta:.4g}"

    def choose_ranks(self, model: Model, layers: list[Layer]) -> dict[str, tuple[int | None, str]]:
        if self.energy is not None:
            return {lay.node.name: self.rank(lay, self.energy) for lay in layers}
        if self.error is not None:
            eta = 1.0 - self.error**2  # relative Frobenius error e <=> kept energy 1 - e^2
            return {lay.node.name: self.rank(lay, eta) for lay in layers}
        # target MACs: bisect a common energy level
        from carve.pipeline.graph.cost import model_cost
        from carve.pipeline.graph.shapes import unknown_conv_outputs

        unknown = unknown_conv_outputs(model)
        if unknown:
            raise CarveError(
                f"decompose `target_macs`: the output size of {len(unknown)} layer(s) is unknown (first: "
                f"{unknown[0]!r}), so MACs cannot be counted",
                hint="give the input size with `input_shape` CxHxW (the model's input dimensions are dynamic)",
            )

        total = model_cost(model).macs
        fixed = total - sum(lay.macs(None) for lay in layers)

        def macs_at(eta: float) -> int:
            return fixed + sum(lay.macs(self.rank(lay, eta)[0]) for lay in layers)

        target = self.target_macs * total
        lo, hi = 0.0, 1.0
        if macs_at(1e-9) > target:
            raise CarveError(
                f"decompose cannot reach {self.target_macs:g} of the MACs even at the smallest ranks "
                f"(best {macs_at(1e-9) / total:.3f}); combine it with pruning or raise the target"
            )
        for _ in range(40):
            mid = (lo + hi) / 2
            if macs_at(mid) <= target:
                lo = mid
            else:
                hi = mid
        return {lay.node.name: self.rank(lay, lo) for lay in layers}

    def split(self, model: Model, lay: Layer, r: int) -> None:
        if lay.node.op_type in LINEAR:
            self.split_linear(model, lay, r)
            return
        n = lay.node
        b, a = factors(lay, r)
        dtype = model.array(n.input[1]).dtype
        bias = model.array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        wb = model.add_initializer(f"{n.name}_basis_W", b.astype(dtype))
        wa = model.add_initializer(f"{n.name}_coeff_W", a.astype(dtype))
        attrs = {x.name: helper.get_attribute_value(x) for x in n.attribute if x.name != "kernel_shape"}
        mid = model.unique_name(f"{n.name}_basis_out")
        basis = helper.make_node(
            "Conv", [n.input[0], wb], [mid], name=f"{n.name}_basis", kernel_shape=list(b.shape[2:]), **attrs
        )
        ins = [mid, wa] + ([model.add_initializer(f"{n.name}_coeff_B", bias)] if bias is not None else [])
        coeff = helper.make_node("Conv", ins, [n.output[0]], name=f"{n.name}_coeff", kernel_shape=[1, 1])
        replace_nodes(model, [n], [basis, coeff])
        model.refresh(shapes=False)

    def split_linear(self, model: Model, lay: Layer, r: int) -> None:
        """y = x W (+ c) as (x B) A (+ c): two MatMuls, or two Gemms of which the second keeps C and beta."""
        n = lay.node
        b, a = factors(lay, r)
        dtype = model.array(n.input[1]).dtype
        wb = model.add_initializer(f"{n.name}_basis_W", b.reshape(r, -1).T.astype(dtype))  # K x r
        wa = model.add_initializer(f"{n.name}_coeff_W", a.reshape(lay.cout, r).T.astype(dtype))  # r x N
        mid = model.unique_name(f"{n.name}_basis_out")
        basis = helper.make_node(n.op_type, [n.input[0], wb], [mid], name=f"{n.name}_basis")
        if n.op_type == "MatMul":
            coeff = helper.make_node("MatMul", [mid, wa], [n.output[0]], name=f"{n.name}_coeff")
        else:
            c = list(n.input[2:3]) if len(n.input) > 2 and n.input[2] else []
            beta = {"beta": float(attr(n, "beta", 1.0))} if c else {}
            coeff = helper.make_node("Gemm", [mid, wa, *c], [n.output[0]], name=f"{n.name}_coeff", **beta)
        replace_nodes(model, [n], [basis, coeff])
        model.refresh(shapes=False)
