// Minimal reverse-mode autograd over f32 ndarray arrays.
// In: parameter/constant leaves, cached feature maps (`Tape::input`) and
// whole-array ops recorded on a `Tape`: the generic ops in the files here,
// the head's fused special cases in `fused` (through `tape::FusedOp`).
// Out: `Tape::backward(loss)` -> `Grads` for the parameter leaves.

pub mod binary;
pub mod conv;
pub mod fused;
pub mod loss_ops;
pub mod matmul;
pub mod pool;
pub mod profile;
pub mod reduce;
pub mod resize;
pub mod shape;
pub mod tape;
pub mod unary;

#[cfg(test)]
pub(crate) mod fd;

pub use binary::BinaryOp;
pub use crate::features::{FeatData, FeatSlice, Features, LendLevel};
pub use tape::{FusedOp, GradAcc, Grads, Op, Tape, Value, Var};
pub use unary::UnaryOp;
