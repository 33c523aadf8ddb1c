#!/usr/bin/env python3
"""Print the YOLOv5 Detect-head part of an ONNX graph (uses only the onnx package).

Finds the head Convs (Convs whose output channels == na * (5 + nc) and whose
result flows into graph output 'output0' via Reshape), then prints every node
that lies between those Convs and the graph output, with each input annotated:
graph input / produced by node / initializer (shape, and values if small) /
Constant node (shape, values if small).

Usage:
    .venv-tools/bin/python tools/dump_detect_head.py MODEL.onnx [--values N]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def fmt_array(a: np.ndarray, max_values: int) -> str:
    s = f"{a.dtype}{list(a.shape)}"
    if a.size <= max_values:
        s += " = " + np.array2string(a.reshape(-1), precision=4, separator=",", max_line_width=200)
    else:
        flat = a.reshape(-1)
        s += f" (first {min(6, a.size)}: {np.array2string(flat[:6], precision=4, separator=',')} ...)"
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--values", type=int, default=12, help="print tensors with at most this many values")
    a = ap.parse_args(argv)

    m = onnx.load(a.model)
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {}
    consumers = defaultdict(list)
    for idx, n in enumerate(g.node):
        for o in n.output:
            producer[o] = idx
        for i in n.input:
            consumers[i].append(idx)
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(at.t)

    meta = {p.key: p.value for p in m.metadata_props}
    print(f"# {a.model}: opset {[o.version for o in m.opset_import]}, producer {m.producer_name} "
          f"{m.producer_version}, {len(g.node)} nodes, {len(g.initializer)} initializers")
    print(f"# metadata: stride={meta.get('stride')} names={meta.get('names', '')[:80]}...")

    # nodes that reach output0 (backwards closure)
    out_name = g.output[0].name
    reach = set()
    stack = [producer[out_name]]
    while stack:
        i = stack.pop()
        if i in reach:
            continue
        reach.add(i)
        for x in g.node[i].input:
            if x in producer:
                stack.append(producer[x])

    # head convs: Conv in reach whose direct consumer is a Reshape
    head_convs = [i for i in sorted(reach) if g.node[i].op_type == "Conv"
                  and any(g.node[c].op_type == "Reshape" for c in consumers[g.node[i].output[0]])]
    # forward closure from head convs
    fwd = set()
    stack = list(head_convs)
    while stack:
        i = stack.pop()
        if i in fwd:
            continue
        fwd.add(i)
        for o in g.node[i].output:
            stack.extend(consumers[o])
    # include nodes feeding the head that are not part of the backbone (shape subgraphs, Constants)
    backbone = set()
    stack = [producer[x] for c in head_convs for x in g.node[c].input if x in producer]
    while stack:
        i = stack.pop()
        if i in backbone:
            continue
        backbone.add(i)
        stack.extend(producer[x] for x in g.node[i].input if x in producer)
    show = sorted((reach - backbone) | fwd)

    for i in show:
        n = g.node[i]
        tag = "HEAD-CONV " if i in head_convs else ""
        attrs = []
        for at in n.attribute:
            if at.name == "value":
                continue
            v = onnx.helper.get_attribute_value(at)
            if isinstance(v, bytes):
                v = v.decode()
            attrs.append(f"{at.name}={v}")
        print(f"[{i}] {tag}{n.op_type} name={n.name!r} -> {list(n.output)} {' '.join(attrs)}")
        if n.op_type == "Constant":
            print(f"      value {fmt_array(consts[n.output[0]], a.values)}")
            continue
        for x in n.input:
            if x == "":
                desc = "(absent)"
            elif x in inits:
                desc = "initializer " + fmt_array(inits[x], a.values)
            elif x in consts:
                desc = "Constant " + fmt_array(consts[x], a.values)
            elif x in producer:
                desc = f"from [{producer[x]}] {g.node[producer[x]].op_type}"
            else:
                desc = "graph input"
            print(f"      in {x!r}: {desc}")


if __name__ == "__main__":
    main()
