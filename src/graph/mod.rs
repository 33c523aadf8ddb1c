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

use anyhow::{Context, Result, bail};

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
        check_not_pytorch(path)?;
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

    /// Replaces initializers by name with `tensors` (same shapes; stored as
    /// f32), as a trained tail is put back into the graph for export, predict
    /// and val. The Detect head's initializers are not among them.
    pub fn replace_initializers(&mut self, tensors: &std::collections::BTreeMap<String, ndarray::ArrayD<f32>>) -> Result<()> {
        let g = self.proto.graph.as_mut().context("the model has no graph")?;
        for (name, v) in tensors {
            let t = g.initializer.iter_mut().find(|t| &t.name == name).with_context(|| format!("no initializer `{name}`"))?;
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            anyhow::ensure!(dims == v.shape(), "initializer `{name}` has shape {dims:?}, the trained tensor {:?}", v.shape());
            let v = v.as_standard_layout();
            *t = onnx::float_tensor(name, &dims, v.as_slice().expect("standard layout"));
        }
        Ok(())
    }

    pub fn initializer_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let g = self.proto.graph.as_ref().unwrap();
        let t = g.initializer.iter().find(|t| t.name == name).with_context(|| format!("no initializer `{name}`"))?;
        onnx::tensor_f32(t)
    }
}

/// A PyTorch checkpoint (`.pt`, `.pth`, or the zip archive torch.save
/// writes, under another name) is refused with the command that exports it to ONNX;
/// every command's `--weights` and `inspect` come through here.
pub fn check_not_pytorch(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let by_name = matches!(ext.as_deref(), Some("pt" | "pth"));
    let mut head = [0u8; 4];
    let by_bytes = std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && head == *b"PK\x03\x04";
    if by_name || by_bytes {
        bail!(
            "{}: freezesplit reads ONNX exports, not PyTorch checkpoints; run `python export.py --weights {} --include onnx` in YOLOv5 and pass the .onnx file it writes",
            path.display(),
            path.display()
        );
    }
    Ok(())
}
