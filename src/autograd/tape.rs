// Tape (Wengert list) for reverse-mode autodiff over f32 `ArrayD`s.
// In: leaves (parameters that need grads, constants that never do) and ops
// recorded by the op-family files. Out: `backward(loss)` -> `Grads`, one
// gradient per parameter leaf that the loss depends on.
//
// Ops are whole-array operations; each op family lives in its own file and
// provides a forward (a `Tape` method) and a backward function that this file
// dispatches to through the `Op` enum. Backward functions push gradients into
// a `GradAcc`, which drops those for constants and lets scatter-type ops add
// into a parent's buffer instead of building a full-size temporary.

use ndarray::ArrayD;

use super::{binary, conv, conv1x1, head_rows, loss_ops, matmul, obj_bce, pool, profile, reduce, resize, shape, unary};
use crate::tail::ops::{ConvSpec, ConvTransposeSpec};

/// Index of a value on the tape. Only meaningful for the tape that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub usize);

/// Index of a batch of frozen features on the tape (see `features::Features`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Feat(pub usize);

/// How a node was produced; holds what its backward needs besides values.
#[derive(Clone, Debug)]
pub enum Op {
    Param,
    Const,
    Binary(binary::BinaryOp, Var, Var),
    Unary(unary::UnaryOp, Var),
    Reduce(reduce::ReduceOp, Var),
    Shape(shape::ShapeOp),
    MatMul(Var, Var),
    LinearGrouped {
        x: Var,
        w: Var,
        b: Var,
        bs: usize,
        groups: usize,
    },
    Conv1x1Channels {
        x: Feat,
        w: Var,
        b: Var,
        chans: Vec<usize>,
    },
    Conv1x1At {
        x: Feat,
        w: Var,
        b: Var,
        picks: Vec<conv1x1::Pick>,
        groups: usize,
    },
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
    /// The head's 1x1 conv into p rows (autograd::head_rows).
    HeadRows {
        x: Var,
        w: Var,
        b: Var,
        na: usize,
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
    /// The fused objectness loss; `dw` `[k, cin]` and `db` `[k]` are
    /// d(loss)/d(w rows `chans`, b[chans]), computed in the forward.
    ObjBce {
        w: Var,
        b: Var,
        chans: Vec<usize>,
        dw: Vec<f32>,
        db: Vec<f32>,
    },
}

pub struct Node {
    pub value: ArrayD<f32>,
    pub op: Op,
    // True when some parameter is upstream; nodes without it are never
    // given a gradient buffer and their backward is skipped.
    pub requires_grad: bool,
}

#[derive(Default)]
pub struct Tape {
    pub nodes: Vec<Node>,
    /// Inputs of the conv1x1 ops, kept apart from the values: never differentiated.
    pub features: Vec<crate::features::Features>,
    /// When the previous node was pushed (only while profiling).
    last_push: Option<std::time::Instant>,
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

    pub fn value(&self, v: Var) -> &ArrayD<f32> {
        &self.nodes[v.0].value
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
        acc.slots[loss.0] = Some(ArrayD::ones(self.nodes[loss.0].value.raw_dim()));

        for i in (0..n).rev() {
            let Some(g) = acc.slots[i].take() else {
                continue;
            };
            let node = &self.nodes[i];
            let t0 = profile::enabled().then(std::time::Instant::now);
            match &node.op {
                Op::Param => out[i] = Some(g),
                Op::Const => {}
                Op::Binary(k, a, b) => binary::backward(self, *k, *a, *b, &node.value, g, &mut acc),
                Op::Unary(k, a) => unary::backward(self, k, *a, &node.value, g, &mut acc),
                Op::Reduce(k, a) => reduce::backward(self, k, *a, g, &mut acc),
                Op::Shape(s) => shape::backward(self, s, g, &mut acc),
                Op::MatMul(a, b) => matmul::backward(self, *a, *b, g, &mut acc),
                Op::LinearGrouped {
                    x,
                    w,
                    b,
                    bs,
                    groups,
                } => matmul::linear_grouped_backward(self, *x, *w, *b, *bs, *groups, g, &mut acc),
                Op::Conv1x1Channels { x, w, b, chans } => conv1x1::channels_backward(self, *x, *w, *b, chans, g, &mut acc),
                Op::Conv1x1At { x, w, b, picks, groups } => conv1x1::at_backward(self, *x, *w, *b, picks, *groups, g, &mut acc),
                Op::Conv2d { x, w, b, spec } => conv::conv2d_backward(self, *x, *w, *b, spec, g, &mut acc),
                Op::ConvTranspose2d { x, w, b, spec } => conv::conv_transpose2d_backward(self, *x, *w, *b, spec, g, &mut acc),
                Op::HeadRows { x, w, b, na } => head_rows::backward(self, *x, *w, *b, *na, g, &mut acc),
                Op::MaxPool2d { x, argmax } => pool::max_pool2d_backward(self, *x, argmax, g, &mut acc),
                Op::ResizeNearest { x, ys, xs } => resize::resize_nearest_backward(self, *x, ys, xs, g, &mut acc),
                Op::BceWithLogits {
                    logits,
                    targets,
                    pos_weight,
                } => loss_ops::bce_backward(self, *logits, *targets, *pos_weight, g, &mut acc),
                Op::ObjBce { w, b, chans, dw, db } => obj_bce::backward(self, *w, *b, chans, dw, db, g, &mut acc),
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
        assert_eq!(
            g.shape(),
            self.tape.nodes[v.0].value.shape(),
            "grad shape mismatch"
        );
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
        let shape = self.tape.nodes[v.0].value.raw_dim();
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
