// Per-op-family timing of tape work, for the benchmark tools (off unless the
// environment sets FREEZESPLIT_PROFILE=1; then every op's forward and backward
// is timed, which costs one clock read per op).
// In: `forward(op, t0)` from `Tape::push_raw` (the time since the tape's
// previous push, so it includes the op's own computation), `backward(op, t0)`
// from `Tape::backward`. Out: `take()`, the totals by family since the last take.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::tape::Op;

static TOTALS: Mutex<BTreeMap<String, (Duration, usize)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FREEZESPLIT_PROFILE").is_ok_and(|v| v == "1"))
}

/// The family an op's time is filed under (names only: formatting an op
/// would print its index vectors).
pub fn family(op: &Op) -> String {
    use super::shape::ShapeOp;
    let s: &str = match op {
        Op::Binary(k, ..) => return format!("{k:?}"),
        Op::Unary(k, _) => return format!("{k:?}").split('(').next().unwrap_or_default().to_string(),
        Op::Reduce(k, _) => return format!("{k:?}").split('(').next().unwrap_or_default().to_string(),
        Op::Shape(ShapeOp::IndexSelect { .. }) => "IndexSelect",
        Op::Shape(ShapeOp::Concat { .. }) => "Concat",
        Op::Shape(ShapeOp::Slice { .. }) => "Slice",
        Op::Shape(ShapeOp::Reshape { .. }) => "Reshape",
        Op::Shape(ShapeOp::Permute { .. }) => "Permute",
        Op::Param => "Param",
        Op::Const => "Const",
        Op::MatMul(..) => "MatMul",
        Op::Conv2d { spec, .. } => return format!("Conv2d k{}s{}", spec.kernel[0], spec.strides[0]),
        Op::ConvTranspose2d { .. } => "ConvTranspose2d",
        Op::MaxPool2d { .. } => "MaxPool2d",
        Op::ResizeNearest { .. } => "ResizeNearest",
        Op::BceWithLogits { .. } => "BceWithLogits",
        Op::Ext(op) => op.name(),
    };
    s.to_string()
}

fn add(key: String, d: Duration) {
    let mut m = TOTALS.lock().unwrap();
    let e = m.entry(key).or_default();
    e.0 += d;
    e.1 += 1;
}

pub fn forward(op: &Op, since: Instant) {
    add(format!("fwd {}", family(op)), since.elapsed());
}

pub fn backward(op: &Op, since: Instant) {
    add(format!("bwd {}", family(op)), since.elapsed());
}

/// A named part of a caller's work (e.g. "phase loss"), from `since`.
pub fn phase(name: &str, since: Instant) {
    if enabled() {
        add(format!("phase {name}"), since.elapsed());
    }
}

/// The totals (time, count) by "fwd/bwd family" since the last call.
pub fn take() -> BTreeMap<String, (Duration, usize)> {
    std::mem::take(&mut *TOTALS.lock().unwrap())
}
