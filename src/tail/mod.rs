// The trainable tail of the network (layers N..23 for `--freeze N`), built
// from its ONNX nodes. In: the tail's nodes; out: op specs (`ops`) that the
// tape ops in `autograd` run and differentiate.

pub mod ops;
