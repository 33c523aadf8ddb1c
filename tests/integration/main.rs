//! All integration tests in one binary: one link instead of eleven, which
//! keeps CI's cold build short. One module per pipeline stage.

mod common;

mod add_classes;
mod cache;
mod data;
mod demo;
mod export;
mod graph;
mod head_parity;
mod hyp_defaults;
mod letterbox;
mod loss_parity;
mod metrics_parity;
mod predict;
mod q8;
mod tail;
mod robust;
mod shard;
mod sparse;
mod train;
mod val;
