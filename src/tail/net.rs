//! The trainable tail as a small program built from the ONNX nodes.
//!
//! In: a `Model`, a `Cut` (which nodes lie after the freeze boundary, which
//! tensors cross it) and the input size the cache was made for. Out: a
//! `TailNet`: steps in topological order (an op spec, the tensors it reads, the
//! initializers it trains), the named parameters (ONNX initializer names →
//! values), and `forward`, which records the steps on a tape from the crossing
//! tensors to the Detect head's inputs.
//!
//! Shape arithmetic (Shape, Gather, ... in front of a Resize) is evaluated here,
//! once, at the cached input size: it decides output sizes and is never
//! trained. Anything the ops layer does not know is refused naming the node.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{ArrayD, IxDyn};

use super::ops::{self, OpSpec, ShapeArg, ShapeValue};
use crate::autograd::{Tape, Var};
use crate::graph::Model;
use crate::graph::cut::Cut;
use crate::graph::onnx::{self, ConstTensor, GraphIndex};
use crate::tail::ops::elementwise::ElementwiseOp;

/// What one step computes on feature maps.
#[derive(Clone, Debug)]
pub enum StepOp {
    Conv(ops::ConvSpec),
    ConvTranspose(ops::ConvTransposeSpec),
    MaxPool(ops::PoolSpec),
    /// Nearest resize to `out` with the `[h, w]` scales ONNX maps by.
    Resize { out: [usize; 2], scales: [f32; 2] },
    Concat(usize),
    Elementwise(ElementwiseOp),
}

/// An input of a step: a feature map by name, or a constant baked in.
#[derive(Clone, Debug)]
pub enum Input {
    Tensor(String),
    Param(String),
    Const(ArrayD<f32>),
}

#[derive(Clone, Debug)]
pub struct Step {
    /// The ONNX node's name (for errors and the layer table).
    pub node: String,
    pub op: StepOp,
    pub inputs: Vec<Input>,
    pub output: String,
    /// `[C, H, W]` of the output at the cached input size.
    pub shape: [usize; 3],
}

#[derive(Clone, Debug)]
pub struct TailNet {
    pub steps: Vec<Step>,
    /// The cut's crossing tensors, in cache order.
    pub crossing: Vec<String>,
    pub head_inputs: Vec<String>,
    /// The initializers the steps train, by ONNX name.
    pub params: BTreeMap<String, ArrayD<f32>>,
}

fn to_shape_value(c: &ConstTensor) -> ShapeValue {
    ShapeValue { dims: c.dims.clone(), values: c.values.clone(), int: c.values.iter().all(|v| v.fract() == 0.0) }
}

fn to_const(v: &ShapeValue) -> ConstTensor {
    ConstTensor { dims: v.dims.clone(), values: v.values.clone() }
}

impl TailNet {
    /// Builds the tail of `model` after `cut` at input size `imgsz`.
    pub fn build(model: &Model, cut: &Cut, imgsz: usize) -> Result<TailNet> {
        let graph = model.proto.graph.as_ref().context("the model has no graph")?;
        let ix = GraphIndex::new(graph);
        // Feature maps: NCHW with batch 1, as the shape arithmetic sees them.
        let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, c) in cut.crossing.iter().enumerate() {
            let [ch, h, w] = cut.shape(i, imgsz);
            shapes.insert(c.name.clone(), vec![1, ch, h, w]);
        }
        let mut consts: HashMap<String, ShapeValue> = HashMap::new();
        let mut params = BTreeMap::new();
        let mut steps = Vec::new();
        for &ni in &cut.tail_nodes {
            let node = ix.node(ni);
            let known = |name: &str| -> Option<ConstTensor> {
                if shapes.contains_key(name) {
                    return None;
                }
                consts.get(name).map(to_const).or_else(|| ix.constant(name))
            };
            let spec = ops::parse(node, &known)?;
            let out = node.output.first().cloned().unwrap_or_default();
            let fmap_inputs: Vec<&str> = node.input.iter().map(String::as_str).filter(|i| shapes.contains_key(*i)).collect();
            let in_shape = |k: usize| -> Result<&Vec<usize>> {
                let name = node.input.get(k).ok_or_else(|| anyhow!("{}: input {k} is missing", ops::who(node)))?;
                shapes.get(name.as_str()).ok_or_else(|| anyhow!("{}: input `{name}` is not a feature map computed in the tail (is the cut complete?)", ops::who(node)))
            };
            let (op, out_shape): (StepOp, Vec<usize>) = match spec {
                OpSpec::ShapeMath(m) => {
                    let args: Vec<ShapeArg> = node
                        .input
                        .iter()
                        .filter(|i| !i.is_empty())
                        .map(|i| match shapes.get(i.as_str()) {
                            Some(s) => Ok(ShapeArg::ShapeOf(s.clone())),
                            None => known(i).map(|c| ShapeArg::Value(to_shape_value(&c))).ok_or_else(|| anyhow!("{}: input `{i}` is neither a feature map nor a constant", ops::who(node))),
                        })
                        .collect::<Result<_>>()?;
                    let v = m.eval(&args)?;
                    consts.insert(out, v);
                    continue;
                }
                OpSpec::Conv(s) => {
                    let x = in_shape(0)?;
                    let [oh, ow] = s.out_hw(x[2], x[3]).ok_or_else(|| anyhow!("{}: the kernel does not fit a {}x{} input", ops::who(node), x[2], x[3]))?;
                    let wd = weight_dims(&ix, node, 1)?;
                    (StepOp::Conv(s), vec![1, wd[0], oh, ow])
                }
                OpSpec::ConvTranspose(s) => {
                    let x = in_shape(0)?;
                    let [oh, ow] = s.out_hw(x[2], x[3]).ok_or_else(|| anyhow!("{}: invalid output size for a {}x{} input", ops::who(node), x[2], x[3]))?;
                    let wd = weight_dims(&ix, node, 1)?;
                    (StepOp::ConvTranspose(s), vec![1, wd[1] * s.groups, oh, ow])
                }
                OpSpec::MaxPool(s) => {
                    let x = in_shape(0)?;
                    let [oh, ow] = s.out_hw(x[2], x[3]).ok_or_else(|| anyhow!("{}: the pool window does not fit a {}x{} input", ops::who(node), x[2], x[3]))?;
                    (StepOp::MaxPool(s), vec![1, x[1], oh, ow])
                }
                OpSpec::Resize(s) => {
                    let x = in_shape(0)?.clone();
                    let (out, scales) = s.out_hw(&x)?;
                    (StepOp::Resize { out, scales }, vec![1, x[1], out[0], out[1]])
                }
                OpSpec::Concat(s) => {
                    if fmap_inputs.len() != node.input.len() {
                        bail!("{}: Concat of feature maps with constants is not supported", ops::who(node));
                    }
                    let first = in_shape(0)?.clone();
                    let mut o = first.clone();
                    o[s.axis] = (0..node.input.len()).map(|k| in_shape(k).map(|s2| s2[s.axis])).sum::<Result<usize>>()?;
                    (StepOp::Concat(s.axis), o)
                }
                OpSpec::Elementwise(e) => {
                    let s0 = shapes.get(fmap_inputs.first().copied().unwrap_or_default()).cloned().ok_or_else(|| anyhow!("{}: no feature-map input", ops::who(node)))?;
                    (StepOp::Elementwise(e), s0)
                }
            };
            let mut inputs = Vec::new();
            for (k, name) in node.input.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                if shapes.contains_key(name.as_str()) {
                    inputs.push(Input::Tensor(name.clone()));
                } else if matches!(op, StepOp::Conv(_) | StepOp::ConvTranspose(_)) && k >= 1 && ix.initializers.contains_key(name.as_str()) {
                    let (d, v) = model.initializer_f32(name)?;
                    params.insert(name.clone(), ArrayD::from_shape_vec(IxDyn(&d), v)?);
                    inputs.push(Input::Param(name.clone()));
                } else if matches!(op, StepOp::Resize { .. } | StepOp::MaxPool(_)) {
                    // scales / sizes / roi: already in the spec
                } else if let Some(c) = known(name) {
                    let dims = c.dims.clone();
                    inputs.push(Input::Const(ArrayD::from_shape_vec(IxDyn(&dims), c.values.iter().map(|&v| v as f32).collect())?));
                } else {
                    bail!("{}: input `{name}` is not produced in the tail, not crossing the boundary and not constant", ops::who(node));
                }
            }
            let shape = [out_shape[1], out_shape[2], out_shape[3]];
            shapes.insert(out.clone(), out_shape);
            steps.push(Step { node: node.name.clone(), op, inputs, output: out, shape });
        }
        for h in &cut.head_inputs {
            if !shapes.contains_key(h) {
                bail!("the tail after --freeze {} does not compute the head input `{h}`", cut.freeze);
            }
        }
        Ok(TailNet { steps, crossing: cut.crossing.iter().map(|c| c.name.clone()).collect(), head_inputs: cut.head_inputs.clone(), params })
    }

    /// Records the tail on `t`: `crossing` in cache order (`[B, C, H, W]`),
    /// `params` the tape leaves of this net's parameters by name. Returns the
    /// head inputs in level order.
    pub fn forward(&self, t: &mut Tape, params: &HashMap<String, Var>, crossing: &[Var]) -> Result<Vec<Var>> {
        let mut values: HashMap<&str, Var> = self.crossing.iter().map(String::as_str).zip(crossing.iter().copied()).collect();
        for s in &self.steps {
            let mut args = Vec::with_capacity(s.inputs.len());
            for i in &s.inputs {
                args.push(match i {
                    Input::Tensor(n) => *values.get(n.as_str()).ok_or_else(|| anyhow!("tail step {}: `{n}` not computed", s.node))?,
                    Input::Param(n) => *params.get(n).ok_or_else(|| anyhow!("tail step {}: parameter `{n}` missing", s.node))?,
                    Input::Const(c) => t.constant(c.clone()),
                });
            }
            let y = match &s.op {
                StepOp::Conv(spec) => t.conv2d(args[0], args[1], args.get(2).copied(), spec),
                StepOp::ConvTranspose(spec) => t.conv_transpose2d(args[0], args[1], args.get(2).copied(), spec),
                StepOp::MaxPool(spec) => t.max_pool2d(args[0], spec),
                StepOp::Resize { out, scales } => t.resize_nearest_scaled(args[0], *out, *scales),
                StepOp::Concat(axis) => t.concat(&args, *axis),
                StepOp::Elementwise(ElementwiseOp::Add) => t.add(args[0], args[1]),
                StepOp::Elementwise(ElementwiseOp::Mul) => t.mul(args[0], args[1]),
                StepOp::Elementwise(ElementwiseOp::Sigmoid) => t.sigmoid(args[0]),
            };
            values.insert(s.output.as_str(), y);
        }
        self.head_inputs.iter().map(|h| values.get(h.as_str()).copied().ok_or_else(|| anyhow!("the tail does not compute `{h}`"))).collect()
    }

    /// Trainable parameter count.
    pub fn param_count(&self) -> usize {
        self.params.values().map(|v| v.len()).sum()
    }
}

fn weight_dims(ix: &GraphIndex, node: &onnx::pb::NodeProto, k: usize) -> Result<Vec<usize>> {
    let name = node.input.get(k).ok_or_else(|| anyhow!("{}: no weight input", ops::who(node)))?;
    let t = ix.initializers.get(name.as_str()).ok_or_else(|| anyhow!("{}: weight `{name}` is not an initializer", ops::who(node)))?;
    Ok(t.dims.iter().map(|&d| d as usize).collect())
}

impl TailNet {
    /// The head inputs for plain f32 crossing tensors (`[B, C, H, W]` each,
    /// in cache order), without gradients: validation, predict and tests.
    pub fn eval(&self, crossing: Vec<ArrayD<f32>>) -> Result<Vec<ArrayD<f32>>> {
        let mut t = Tape::new();
        let params: HashMap<String, Var> = self.params.iter().map(|(k, v)| (k.clone(), t.constant(v.clone()))).collect();
        let xs: Vec<Var> = crossing.into_iter().map(|x| t.constant(x)).collect();
        let outs = self.forward(&mut t, &params, &xs)?;
        Ok(outs.iter().map(|&v| t.value(v).clone()).collect())
    }
}
