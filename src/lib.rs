//! freezesplit: fine-tune the Detect head of an exported YOLOv5 ONNX on CPU.
//!
//! The pipeline is the architecture: model graph (`graph`) → split
//! (`graph::split`) → engine (`engine`) → feature cache (`cache`, read back
//! as `features`) → head (`head`) + autograd (`autograd`, `kernels`) → loss →
//! training → metrics → export. The `freezesplit` binary is a thin layer over
//! these modules (`cli`).

pub mod autograd;
pub mod cache;
pub mod cli;
pub mod data;
pub mod demo;
pub mod engine;
pub mod export;
pub mod features;
pub mod fsutil;
pub mod graph;
pub mod head;
pub mod kernels;
pub mod loss;
pub mod metrics;
pub mod plots;
pub mod predict;
pub mod preprocess;
pub mod runs;
pub mod tail;
pub mod train;
pub mod val;
pub mod weights;
