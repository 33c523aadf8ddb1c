// Minimal reverse-mode autograd over f32 ndarray arrays.
// In: parameter/constant leaves and whole-array ops recorded on a `Tape`.
// Out: `Tape::backward(loss)` -> `Grads` for the parameter leaves.

pub mod binary;
pub mod conv;
pub mod conv1x1;
pub mod head_rows;
pub mod loss_ops;
pub mod matmul;
pub mod obj_bce;
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
pub use tape::{Feat, GradAcc, Grads, Op, Tape, Var};
pub use unary::UnaryOp;
