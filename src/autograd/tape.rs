// Tape (Wengert list) for reverse-mode autodiff.
// In: leaves (parameters that need grads, constants that never do, and cached
// feature maps kept as stored, see `Value`) and ops recorded by the op-family
// files. Out: `backward(loss)` -> `Grads`, one gradient per parameter leaf
// that the loss depends on.
//
// Ops are whole-array operations; each op family lives in its own file and
// provides a forward (a `Tape` method) and a backward function that this file
// dispatches to through the `Op` enum. The enum holds only generic ops; a
// special-cased fused op (autograd::fused) implements `FusedOp` and is
// recorded with `push_ext`, so adding one needs no change here. Backward
// functions push gradients into a `GradAcc`, which drops those for constants
// and lets scatter-type ops add into a parent's buffer instead of building a
// full-size temporary.

use std::any::Any;

use ndarray::ArrayD;

use super::{binary, conv, loss_ops, matmul, pool, profile, reduce, resize, shape, unary};
use crate::features::Features;
use crate::tail::ops::{ConvSpec, ConvTransposeSpec};

/// Index of a value on the tape. Only meaningful for the tape that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub usize);

/// An op recorded through the extension point: a fast special case (e.g. the
/// YOLOv5 head's loss read straight from cached f16 maps) that the generic
/// ops could express only at several times the cost. The op keeps its input
/// `Var`s and whatever its backward needs; its forward is a `Tape` method that
/// computes the value and calls `Tape::push_ext`. (candle's `CustomOp1/2/3`
/// play the same part.)
pub trait FusedOp: Any + Send + Sync {
    /// The family the profiler files its time under (autograd::profile).
    fn name(&self) -> &'static str;
    /// Push d(loss)/d(input) for each input into `acc`, given `g` =
    /// d(loss)/d(this op's value). Check `acc.wants(v)` before computing an
    /// input's gradient: constants (and feature maps) never want one.
    fn backward(&self, tape: &Tape, g: ArrayD<f32>, acc: &mut GradAcc);
}

impl std::fmt::Debug for dyn FusedOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a node was produced; holds what its backward needs besides values.
#[derive(Debug)]
pub enum Op {
    Param,
    Const,
    Binary(binary::BinaryOp, Var, Var),
    Unary(unary::UnaryOp, Var),
    Reduce(reduce::ReduceOp, Var),
    Shape(shape::ShapeOp),
    MatMul(Var, Var),
    /// ONNX Conv / ConvTranspose on NCHW maps (autograd::conv).
    Conv2d {
        x: Var,
        w: Var,
        b: Option<Var>,
        spec: ConvSpec,
    },
    ConvTranspose2d {
        x: Var,
        w: Var,
        b: Option<Var>,
        spec: ConvTransposeSpec,
    },
    /// ONNX MaxPool; `argmax[i]` is output i's winning cell in its input
    /// plane (u32::MAX: none).
    MaxPool2d {
        x: Var,
        argmax: Vec<u32>,
    },
    /// Nearest resize; output row/column i reads input row `ys[i]` / column `xs[i]`.
    ResizeNearest {
        x: Var,
        ys: Vec<usize>,
        xs: Vec<usize>,
    },
    BceWithLogits {
        logits: Var,
        targets: Var,
        pos_weight: f32,
    },
    /// A fused op (see `FusedOp`).
    Ext(Box<dyn FusedOp>),
}

/// A node's value. Every op result and ordinary leaf is an f32 array; a
/// cached feature map (`Tape::input`) stays as the cache stores it, f16 and
/// usually lent from a memory-mapped entry, because expanding a batch's maps
/// to f32 costs as much as the head's own arithmetic on them. Only the ops
/// that read `Features` (autograd::fused) take such a leaf; `Tape::value` on
/// it panics with a message naming `Tape::map_to_f32`, the explicit copy.
pub enum Value {
    F32(ArrayD<f32>),
    /// The map and its `[B, C, H, W]` shape.
    Map(Features, [usize; 4]),
}

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(a) => a.shape(),
            Value::Map(_, s) => s,
        }
    }
}

pub struct Node {
    pub value: Value,
    pub op: Op,
    // True when some parameter is upstream; nodes without it are never
    // given a gradient buffer and their backward is skipped.
    pub requires_grad: bool,
}

#[derive(Default)]
pub struct Tape {
    pub nodes: Vec<Node>,
    /// When the previous node was pushed (only while profiling).
    last_push: Option<std::time::Instant>,
    /// The GEMM path of the convolutions, forward and backward (None: the
    /// CPU's fastest f32 path; the training step of a tail may set bf16).
    gemm: Option<crate::kernels::conv::Path>,
}

/// Gradients of the parameter leaves, indexed by `Var`.
pub struct Grads {
    grads: Vec<Option<ArrayD<f32>>>,
}

impl Grads {
    /// None when the parameter does not influence the loss.
    pub fn get(&self, v: Var) -> Option<&ArrayD<f32>> {
        self.grads.get(v.0).and_then(|g| g.as_ref())
    }

    pub fn take(&mut self, v: Var) -> Option<ArrayD<f32>> {
        self.grads.get_mut(v.0).and_then(|g| g.take())
    }
}

impl Tape {
    pub fn new() -> Self {
        Tape::default()
    }

    /// A tape whose convolutions run on the given GEMM path.
    pub fn with_gemm(gemm: crate::kernels::conv::Path) -> Self {
        Tape { gemm: Some(gemm), ..Tape::default() }
    }

    /// The GEMM path of this tape's convolutions.
    pub fn gemm(&self) -> crate::kernels::conv::Path {
        self.gemm.unwrap_or_else(crate::kernels::conv::path)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Leaf that receives a gradient.
    pub fn param(&mut self, value: ArrayD<f32>) -> Var {
        self.push_raw(value, Op::Param, true)
    }

    /// Leaf without gradient (frozen features, targets, detached values).
    pub fn constant(&mut self, value: ArrayD<f32>) -> Var {
        self.push_raw(value, Op::Const, false)
    }

    pub fn scalar_const(&mut self, v: f32) -> Var {
        self.constant(ndarray::arr0(v).into_dyn())
    }

    /// Copy of a value as a new constant: the `torch.no_grad()` / `.detach()`
    /// of the tape.
    pub fn detach(&mut self, v: Var) -> Var {
        let value = self.value(v).clone();
        self.constant(value)
    }

    /// The f32 value of `v`; panics on a feature map (see `Value`).
    pub fn value(&self, v: Var) -> &ArrayD<f32> {
        match &self.nodes[v.0].value {
            Value::F32(a) => a,
            Value::Map(_, s) => panic!(
                "Tape::value: var {} is a cached feature map {s:?} kept as stored (f16); the op reading it must take Features (Tape::map), or copy it to f32 first with Tape::map_to_f32",
                v.0
            ),
        }
    }

    /// The shape of `v`, an array or a feature map.
    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    /// A cached feature map as a leaf without gradient, `[B, C, H, W]`.
    pub fn input(&mut self, f: Features) -> Var {
        let shape = f.shape();
        self.push_node(Value::Map(f, shape), Op::Const, false)
    }

    /// The map of a leaf made by `input`; panics on any other var.
    pub fn map(&self, v: Var) -> &Features {
        match &self.nodes[v.0].value {
            Value::Map(f, _) => f,
            Value::F32(a) => panic!("Tape::map: var {} is an f32 array {:?}, not a feature map from Tape::input", v.0, a.shape()),
        }
    }

    /// An f32 copy of a feature map, `[B, C, H, W]`, as a new constant: for
    /// the generic ops, at the cost `Value` explains.
    pub fn map_to_f32(&mut self, v: Var) -> Var {
        let a = self.map(v).to_array();
        self.constant(a)
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// Value of a 0-d (or single-element) node.
    pub fn scalar(&self, v: Var) -> f32 {
        let a = self.value(v);
        assert_eq!(a.len(), 1, "scalar() on a value with {} elements", a.len());
        *a.iter().next().unwrap()
    }

    pub(crate) fn push_raw(&mut self, value: ArrayD<f32>, op: Op, requires_grad: bool) -> Var {
        self.push_node(Value::F32(value), op, requires_grad)
    }

    fn push_node(&mut self, value: Value, op: Op, requires_grad: bool) -> Var {
        if profile::enabled() {
            if let Some(t0) = self.last_push {
                profile::forward(&op, t0);
            }
            self.last_push = Some(std::time::Instant::now());
        }
        self.nodes.push(Node {
            value,
            op,
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    /// Record an op result; requires_grad follows from the inputs.
    pub(crate) fn push_op(&mut self, value: ArrayD<f32>, op: Op, inputs: &[Var]) -> Var {
        let rg = inputs.iter().any(|v| self.nodes[v.0].requires_grad);
        self.push_raw(value, op, rg)
    }

    /// Record a fused op's result (the extension point, see `FusedOp`);
    /// `inputs` are the vars its value depends on.
    pub fn push_ext(&mut self, value: ArrayD<f32>, op: impl FusedOp, inputs: &[Var]) -> Var {
        self.push_op(value, Op::Ext(Box::new(op)), inputs)
    }

    /// The fused op that made `v`, if it is one of type `T` (for tests and tools).
    pub fn ext_op<T: FusedOp>(&self, v: Var) -> Option<&T> {
        match &self.nodes[v.0].op {
            Op::Ext(op) => (op.as_ref() as &dyn Any).downcast_ref::<T>(),
            _ => None,
        }
    }

    /// Reverse sweep from `loss` (seeded with ones, so a non-scalar loss means
    /// d(sum(loss))). Intermediate gradients are dropped as soon as they are
    /// propagated; only parameter leaves keep theirs.
    pub fn backward(&self, loss: Var) -> Grads {
        let n = loss.0 + 1;
        let mut acc = GradAcc {
            tape: self,
            slots: Vec::with_capacity(n),
        };
        acc.slots.resize_with(n, || None);
        let mut out: Vec<Option<ArrayD<f32>>> = Vec::with_capacity(n);
        out.resize_with(n, || None);
        if !self.nodes[loss.0].requires_grad {
            return Grads { grads: out };
        }
        acc.slots[loss.0] = Some(ArrayD::ones(self.value(loss).raw_dim()));

        for i in (0..n).rev() {
            let Some(g) = acc.slots[i].take() else {
                continue;
            };
            let node = &self.nodes[i];
            let t0 = profile::enabled().then(std::time::Instant::now);
            match &node.op {
                Op::Param => out[i] = Some(g),
                Op::Const => {}
                Op::Binary(k, a, b) => binary::backward(self, *k, *a, *b, self.value(Var(i)), g, &mut acc),
                Op::Unary(k, a) => unary::backward(self, k, *a, self.value(Var(i)), g, &mut acc),
                Op::Reduce(k, a) => reduce::backward(self, k, *a, g, &mut acc),
                Op::Shape(s) => shape::backward(self, s, g, &mut acc),
                Op::MatMul(a, b) => matmul::backward(self, *a, *b, g, &mut acc),
                Op::Conv2d { x, w, b, spec } => conv::conv2d_backward(self, *x, *w, *b, spec, g, &mut acc),
                Op::ConvTranspose2d { x, w, b, spec } => conv::conv_transpose2d_backward(self, *x, *w, *b, spec, g, &mut acc),
                Op::MaxPool2d { x, argmax } => pool::max_pool2d_backward(self, *x, argmax, g, &mut acc),
                Op::ResizeNearest { x, ys, xs } => resize::resize_nearest_backward(self, *x, ys, xs, g, &mut acc),
                Op::BceWithLogits {
                    logits,
                    targets,
                    pos_weight,
                } => loss_ops::bce_backward(self, *logits, *targets, *pos_weight, g, &mut acc),
                Op::Ext(op) => op.backward(self, g, &mut acc),
            }
            if let Some(t0) = t0 {
                profile::backward(&node.op, t0);
            }
        }
        Grads { grads: out }
    }
}

/// Gradient accumulator handed to each op's backward. Vars that do not
/// require a gradient are ignored, so ops may call `add` unconditionally
/// (but should check `wants` before computing something expensive).
pub struct GradAcc<'t> {
    tape: &'t Tape,
    slots: Vec<Option<ArrayD<f32>>>,
}

impl GradAcc<'_> {
    pub fn wants(&self, v: Var) -> bool {
        self.tape.nodes[v.0].requires_grad
    }

    /// Adds a gradient of exactly `v`'s shape (moved in if it is the first).
    pub fn add(&mut self, v: Var, g: ArrayD<f32>) {
        if !self.wants(v) {
            return;
        }
        assert_eq!(g.shape(), self.tape.shape(v), "grad shape mismatch");
        match &mut self.slots[v.0] {
            // large maps (a tail tensor read by two convs) in parallel;
            // elementwise, so the sums do not depend on it
            Some(acc) if acc.len() >= super::binary::PAR_MIN => ndarray::Zip::from(acc).and(&g).par_for_each(|a, &b| *a += b),
            Some(acc) => *acc += &g,
            slot @ None => *slot = Some(g),
        }
    }

    /// The (zero-initialised) gradient buffer of `v`, for ops that scatter
    /// into part of it rather than build a full-size array.
    pub fn buffer(&mut self, v: Var) -> &mut ArrayD<f32> {
        let shape = self.tape.shape(v);
        self.slots[v.0].get_or_insert_with(|| ArrayD::zeros(shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn constants_get_no_grad_and_params_do() {
        let mut t = Tape::new();
        let w = t.param(arr1(&[1.0f32, 2.0]).into_dyn());
        let c = t.constant(arr1(&[3.0f32, 4.0]).into_dyn());
        let y = t.mul(w, c);
        let l = t.sum(y);
        assert!(!t.requires_grad(c));
        let g = t.backward(l);
        assert!(g.get(c).is_none());
        assert_eq!(g.get(w).unwrap().as_slice().unwrap(), &[3.0, 4.0]);
    }

    #[test]
    fn fan_out_accumulates() {
        let mut t = Tape::new();
        let w = t.param(arr1(&[2.0f32]).into_dyn());
        let y = t.mul(w, w);
        let z = t.add(y, w);
        let l = t.sum(z);
        let g = t.backward(l);
        assert_eq!(g.get(w).unwrap()[[0]], 5.0);
    }

    #[test]
    fn detach_stops_gradient() {
        let mut t = Tape::new();
        let w = t.param(arr1(&[3.0f32]).into_dyn());
        let d = t.detach(w);
        let y = t.mul(w, d);
        let l = t.sum(y);
        let g = t.backward(l);
        assert_eq!(g.get(w).unwrap()[[0]], 3.0);
    }
}
