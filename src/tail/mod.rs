//! The trainable tail of the network (layers N..23 for `--freeze N`), built
//! from its ONNX nodes. In: a model and its cut; out: `TailNet`, the steps
//! from the crossing tensors to the Detect head's inputs with its named
//! parameters, recorded on the tape (`autograd`) from the op specs (`ops`).

pub mod ops;
pub mod net;

pub use net::TailNet;
