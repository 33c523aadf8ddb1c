//! The model graph stage: an exported YOLOv5 ONNX in; its Detect head
//! (`detect`), the `model.N` layer of every node (`layers`), the freeze
//! boundary `--freeze N` (`cut`), the frozen graph at it (`split`) and a
//! YOLOv5-style layer table (`summary`) out. `onnx` keeps the protobuf types
//! apart.

pub mod cut;
pub mod detect;
pub mod layers;
pub mod onnx;
pub mod split;
pub mod summary;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use cut::{Crossing, Cut};
pub use detect::{DetectSpec, LevelSpec};

/// An exported model, read and understood.
pub struct Model {
    pub path: PathBuf,
    pub proto: onnx::pb::ModelProto,
    pub spec: DetectSpec,
}

impl Model {
    /// Reads an ONNX export and finds its Detect head; any failure is one
    /// sentence that names the file.
    pub fn load(path: &Path) -> Result<Model> {
        let proto = onnx::load_model(path)?;
        let spec = detect::find_detect(&proto).with_context(|| format!("{} is not a YOLOv5 detector export", path.display()))?;
        Ok(Model { path: path.to_path_buf(), proto, spec })
    }

    /// The frozen graph of `--freeze 24` as ONNX bytes.
    pub fn frozen_bytes(&self) -> Result<Vec<u8>> {
        Ok(onnx::encode_model(&split::frozen_graph(&self.proto, &self.spec)?))
    }

    /// The freeze boundary `--freeze freeze` (see `cut::cut`).
    pub fn cut(&self, freeze: usize) -> Result<Cut> {
        cut::cut(self, freeze)
    }

    /// The frozen graph at `cut` as ONNX bytes.
    pub fn frozen_bytes_at(&self, cut: &Cut) -> Result<Vec<u8>> {
        Ok(onnx::encode_model(&split::frozen_graph_at(&self.proto, &self.spec, cut)?))
    }

    pub fn initializer_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let g = self.proto.graph.as_ref().unwrap();
        let t = g.initializer.iter().find(|t| t.name == name).with_context(|| format!("no initializer `{name}`"))?;
        onnx::tensor_f32(t)
    }
}
