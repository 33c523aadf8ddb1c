"""A YOLOv5 DetectionModel cut at a freeze boundary N, as issue 11 cuts the ONNX graph.

In: a ``yolov5.models.yolo.DetectionModel`` (its ``model`` Sequential, each layer
with ``.i`` and ``.f`` as parse_model sets them) and N. Out: the crossing layers
(the layers < N whose outputs layers >= N read, skip connections included), the
frozen run (layers 0..N-1 -> those outputs) and the tail run (layers N..24 from
them -> Detect's output), each exactly the computation of
``DetectionModel._forward_once``, only split. Used by tail_fixtures.py and
peer_cached_train.py.
"""
from __future__ import annotations


def layer_inputs(model) -> list[list[int]]:
    """Absolute indices of the layers each layer reads (``f`` with -1 resolved)."""
    out = []
    for m in model.model:
        f = [m.f] if isinstance(m.f, int) else list(m.f)
        out.append([m.i - 1 if j == -1 else j for j in f])
    return out


def crossing(model, n: int) -> list[int]:
    """Layers < n whose output a layer >= n reads (N = 10 -> [4, 6, 9], N = 24 -> [17, 20, 23])."""
    ins = layer_inputs(model)
    return sorted({j for i in range(n, len(ins)) for j in ins[i] if j < n})


def run_layers(model, x, n: int) -> list:
    """Layers 0..n-1 on the images x, every layer's output (index = layer)."""
    y = []
    for m in model.model[:n]:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        y.append(x)
    return y


def run_frozen(model, x, n: int) -> dict:
    """Layers 0..n-1 on the images x, keeping only the crossing outputs {layer: tensor}."""
    keep = set(crossing(model, n))
    need = set(j for ins in layer_inputs(model)[:n] for j in ins) | keep
    y = {}
    for m in model.model[:n]:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        if m.i in need:
            y[m.i] = x
    return {j: y[j] for j in sorted(keep)}


def run_tail(model, n: int, cross: dict):
    """Layers n..24 from the crossing tensors {layer: tensor}, as _forward_once would run them."""
    y: list = [None] * len(model.model)
    for j, t in cross.items():
        y[j] = t
    x = None
    for m in model.model[n:]:
        if m.f == -1:
            x = y[m.i - 1]
        elif isinstance(m.f, int):
            x = y[m.f]
        else:
            x = [y[m.i - 1] if j == -1 else y[j] for j in m.f]
        x = m(x)
        y[m.i] = x
    return x
