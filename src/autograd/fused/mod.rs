// Fused ops: YOLOv5-specific special cases of the head, recorded on the tape
// through the extension point (`tape::FusedOp`, `Tape::push_ext`) rather than
// as core `Op` variants.
// In: `Var`s, among them cached feature maps (`Tape::input`, f16 as stored,
// `[B, C, H, W]`) that only these ops read. Out: the vars the loss reads.
// Why they exist: speed of the head. At N = 24 the whole trainable net is the
// Detect head's three 1x1 convs, and ComputeLoss reads their outputs sparsely
// (box/cls at a few hundred positives, objectness everywhere but only its
// mean BCE). The generic conv + reshape + BCE chain computes every channel at
// every position in f32 and materialises each step; these compute what the
// loss reads, straight from the f16 cache. Each is checked against the
// generic ops it replaces and against finite differences in its own tests.
// - conv1x1: the objectness channels everywhere / all channels at picks.
// - obj_bce: the objectness BCE fused with its conv (no focal loss).
// - head_rows: the head's conv written as p rows (tail training, N < 24).
// - linear_grouped: the head's conv on row-major f32 features, the plain
//   reference path of the loss (`loss::head_forward`).

pub mod conv1x1;
pub mod head_rows;
pub mod linear_grouped;
pub mod obj_bce;
