//! ONNX Runtime back end. The shared library is loaded at run time
//! (`load-dynamic`) from `--ort-lib`, `ORT_DYLIB_PATH`, or the `onnxruntime`
//! wheel in a `.venv` next to the project or the binary, so nothing is
//! downloaded at build time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{ArrayD, ArrayView4, ArrayViewD};
use ort::session::Session;
use ort::value::TensorRef;

use super::{Device, EngineOptions};

pub struct OrtEngine {
    session: Session,
    outputs: Vec<String>,
    pub device_label: String,
}

static ENV: OnceLock<std::result::Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Where the ONNX Runtime library is, if anywhere.
pub fn find_library(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.extend(Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().map(Path::to_path_buf));
    roots.iter().find_map(|r| find_in_venv(&r.join(".venv")))
}

/// `VENV/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so*`
fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    for py in lib.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "onnxruntime.dll" || n.starts_with("libonnxruntime.") && n.ends_with(".dylib")))
            .collect();
        libs.sort();
        if let Some(l) = libs.pop() {
            return Some(l);
        }
    }
    None
}

fn environment(lib: &Path) -> Result<&'static ort::environment::Environment> {
    let entry = ENV.get_or_init(|| {
        let builder = ort::init_from(lib).map_err(|e| format!("cannot load the ONNX Runtime library {}: {e}", lib.display()))?;
        let env = builder.with_name("freezesplit").build().map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", lib.display()))?;
        Ok((env, lib.to_path_buf()))
    });
    match entry {
        Ok((env, _)) => Ok(env),
        Err(e) => Err(anyhow!("{e}")),
    }
}

impl OrtEngine {
    pub fn new(frozen: &[u8], opts: &EngineOptions) -> Result<OrtEngine> {
        let lib = find_library(opts.ort_lib.as_deref()).ok_or_else(|| {
            anyhow!("the ONNX Runtime library was not found: pass --ort-lib PATH/libonnxruntime.so, set ORT_DYLIB_PATH, or `python3 -m venv .venv && .venv/bin/pip install onnxruntime`; or use --engine tract")
        })?;
        if !lib.exists() {
            bail!("the ONNX Runtime library {} does not exist", lib.display());
        }
        let env = environment(&lib)?;
        let threads = opts.threads();
        let make = |with_cuda: Option<i32>| -> Result<Session> {
            let mut b = Session::builder(env)?
                .with_intra_threads(threads)
                .map_err(|e| anyhow!("{e}"))?
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
                .map_err(|e| anyhow!("{e}"))?
                .with_intra_op_spinning(opts.ort_spinning)
                .map_err(|e| anyhow!("{e}"))?;
            if let Some(id) = with_cuda {
                b = b
                    .with_execution_providers([ort::ep::CUDA::default().with_device_id(id).build().error_on_failure()])
                    .map_err(|e| anyhow!("the CUDA execution provider could not be registered on cuda:{id} ({e}); install onnxruntime-gpu with matching CUDA libraries, or use --device cpu"))?;
            }
            b.commit_from_memory(frozen).context("ONNX Runtime rejected the frozen graph")
        };
        let (session, device_label) = match opts.device {
            Device::Cpu => (make(None)?, "cpu".to_string()),
            Device::Cuda(id) => (make(Some(id))?, format!("cuda:{id}")),
            Device::Auto => match make(Some(0)) {
                Ok(s) => (s, "cuda:0".to_string()),
                Err(e) => {
                    eprintln!("note: --device auto: CUDA is not available ({e:#}); running ONNX Runtime on the CPU");
                    (make(None)?, "cpu".to_string())
                }
            },
        };
        let outputs = session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(OrtEngine { session, outputs, device_label })
    }

    pub fn run(&mut self, batch: ArrayView4<f32>) -> Result<Vec<ArrayD<f32>>> {
        self.run_with(batch, |outs| outs.iter().map(|o| o.to_owned()).collect())
    }

    /// Runs a batch and lends the outputs to `f` where ONNX Runtime holds them.
    pub fn run_with<R>(&mut self, batch: ArrayView4<f32>, f: impl FnOnce(&[ArrayViewD<f32>]) -> R) -> Result<R> {
        let batch = batch.as_standard_layout();
        let outputs = self.session.run(ort::inputs![TensorRef::from_array_view(batch.view())?])?;
        let views = self.outputs.iter().map(|name| Ok(outputs[name.as_str()].try_extract_array::<f32>()?)).collect::<Result<Vec<_>>>()?;
        Ok(f(&views))
    }
}
