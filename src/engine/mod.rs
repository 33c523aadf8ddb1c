//! The engine stage: frozen-graph ONNX bytes and letterboxed batches in;
//! per-level feature maps out. Two back ends: ONNX Runtime through `ort`
//! (loaded at run time from a shared library, CPU or CUDA) and pure-Rust
//! `tract-onnx`, the embedded default that needs nothing installed.

pub mod ort_engine;
pub mod tract_engine;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{ArrayD, ArrayView3, ArrayView4, ArrayViewD, Axis, Ix4};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    Auto,
    Ort,
    Tract,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Device {
    Auto,
    Cpu,
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device `{s}`: use cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Validated engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub engine: EngineChoice,
    pub device: Device,
    pub ort_lib: Option<PathBuf>,
    /// Worker threads; 0 means all cores.
    pub threads: usize,
    /// Let ONNX Runtime's idle workers spin. Off by default: while the cache
    /// fills, spinning burns the cores that decode and write the neighbouring
    /// batches; a bare inference loop is a little faster with it.
    pub ort_spinning: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { engine: EngineChoice::Auto, device: Device::Auto, ort_lib: None, threads: 0, ort_spinning: false }
    }
}

impl EngineOptions {
    pub fn threads(&self) -> usize {
        if self.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { self.threads }
    }
}

/// Says once per process that `auto` chose tract (a demo builds engines twice).
fn tract_notice() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("note: ONNX Runtime library not found (--ort-lib, ORT_DYLIB_PATH or ./.venv); using the tract engine"));
}

/// A loaded graph, ready to run; errors name the model file it came from
/// when the engine was built with `for_model` or `for_fill`.
pub struct Engine {
    back: Back,
    model: Option<PathBuf>,
}

enum Back {
    Ort(ort_engine::OrtEngine),
    Tract(tract_engine::TractEngine),
}

impl Engine {
    /// Builds the engine the options ask for. `auto` takes ONNX Runtime when
    /// its library is found, else tract, and says so on stderr.
    pub fn new(graph: &[u8], imgsz: usize, opts: &EngineOptions) -> Result<Engine> {
        Ok(Engine { back: Self::back(graph, imgsz, opts)?, model: None })
    }

    /// `new` for a graph made from the model file `model` (its frozen part or
    /// its export): every error names that file.
    pub fn for_model(model: &Path, graph: &[u8], imgsz: usize, opts: &EngineOptions) -> Result<Engine> {
        let back = Self::back(graph, imgsz, opts).with_context(|| format!("the engine cannot load the graph of {}", model.display()))?;
        Ok(Engine { back, model: Some(model.to_path_buf()) })
    }

    fn back(graph: &[u8], imgsz: usize, opts: &EngineOptions) -> Result<Back> {
        if imgsz == 0 {
            bail!("the image size must be positive");
        }
        match opts.engine {
            EngineChoice::Ort => Ok(Back::Ort(ort_engine::OrtEngine::new(graph, opts)?)),
            EngineChoice::Tract => {
                if let Device::Cuda(_) = opts.device {
                    bail!("the tract engine runs on the CPU only; use --engine ort for --device cuda");
                }
                Ok(Back::Tract(tract_engine::TractEngine::new(graph, imgsz, opts)?))
            }
            EngineChoice::Auto => match ort_engine::find_library(opts.ort_lib.as_deref()) {
                Some(_) => Ok(Back::Ort(ort_engine::OrtEngine::new(graph, opts)?)),
                None => {
                    if let Device::Cuda(_) = opts.device {
                        bail!("--device cuda needs ONNX Runtime, and its library was not found: pass --ort-lib or set ORT_DYLIB_PATH");
                    }
                    tract_notice();
                    Ok(Back::Tract(tract_engine::TractEngine::new(graph, imgsz, opts)?))
                }
            },
        }
    }

    /// The engines for filling the cache from the frozen graph of the model
    /// file `model`: on a CPU with several cores, two
    /// sessions with half the threads each, run side by side on alternate
    /// batches. One session's threads wait for each other at every op, and
    /// on a small machine the decoding and writing around them keep
    /// preempting one; two sessions keep the cores busy through those gaps.
    pub fn for_fill(model: &Path, frozen: &[u8], imgsz: usize, opts: &EngineOptions) -> Result<Vec<Engine>> {
        let threads = opts.threads();
        let n = if matches!(opts.device, Device::Cuda(_)) || threads < 2 { 1 } else { 2 };
        let half = EngineOptions { threads: (threads / n).max(1), ..opts.clone() };
        if n > 1 && opts.device == Device::Cpu {
            // nothing left to decide but the back end: build both at once
            // (graph optimisation takes a while per session)
            let engine = match opts.engine {
                EngineChoice::Auto if ort_engine::find_library(opts.ort_lib.as_deref()).is_some() => EngineChoice::Ort,
                EngineChoice::Auto => {
                    tract_notice();
                    EngineChoice::Tract
                }
                e => e,
            };
            let one = EngineOptions { engine, ..half };
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| Engine::for_model(model, frozen, imgsz, &one));
                let b = Engine::for_model(model, frozen, imgsz, &one);
                (a.join().unwrap_or_else(|_| Err(anyhow::anyhow!("building an engine for {} panicked", model.display()))), b)
            });
            return Ok(vec![a?, b?]);
        }
        let first = Engine::for_model(model, frozen, imgsz, if n > 1 { &half } else { opts })?;
        if n == 1 || matches!(&first.back, Back::Ort(e) if e.device_label != "cpu") {
            return Ok(vec![first]);
        }
        // the second like the first (auto has decided by now)
        let choice = if matches!(first.back, Back::Ort(_)) { EngineChoice::Ort } else { EngineChoice::Tract };
        let second = Engine::for_model(model, frozen, imgsz, &EngineOptions { engine: choice, device: Device::Cpu, ..half })?;
        Ok(vec![first, second])
    }

    /// Adds the model file to a run error.
    fn named<T>(&self, r: Result<T>) -> Result<T> {
        match &self.model {
            Some(m) => r.with_context(|| format!("the engine failed on the graph of {}", m.display())),
            None => r,
        }
    }

    pub fn name(&self) -> String {
        match &self.back {
            Back::Ort(e) => format!("ort ({})", e.device_label),
            Back::Tract(_) => "tract (cpu)".to_string(),
        }
    }

    /// Runs a batch `[B, 3, H, W]`; returns the graph outputs in order (for a
    /// frozen graph: the head inputs `[B, C, h, w]`, level by level).
    pub fn run(&mut self, batch: ArrayView4<f32>) -> Result<Vec<ArrayD<f32>>> {
        let r = match &mut self.back {
            Back::Ort(e) => e.run(batch),
            Back::Tract(e) => e.run(batch),
        };
        self.named(r)
    }

    /// Runs a batch and hands image `b`'s outputs (`[C, h, w]` per level) to
    /// `f(b, levels)`, in order, without copying them out of the engine first.
    pub fn run_images<R>(&mut self, batch: ArrayView4<f32>, mut f: impl FnMut(usize, &[ArrayView3<f32>]) -> R) -> Result<Vec<R>> {
        let n = batch.dim().0;
        let mut per_image = |outs: &[ArrayViewD<f32>]| -> Result<Vec<R>> {
            let levels: Vec<ArrayView4<f32>> = outs.iter().map(|o| o.view().into_dimensionality::<Ix4>()).collect::<Result<_, _>>()?;
            if levels.iter().any(|l| l.dim().0 != n) {
                bail!("the engine returned outputs for another batch size than {n}");
            }
            Ok((0..n).map(|b| f(b, &levels.iter().map(|l| l.index_axis(Axis(0), b)).collect::<Vec<_>>())).collect())
        };
        let r = match &mut self.back {
            Back::Ort(e) => e.run_with(batch, |outs| per_image(outs)).and_then(|r| r),
            Back::Tract(e) => e.run(batch).and_then(|outs| per_image(&outs.iter().map(|o| o.view()).collect::<Vec<_>>())),
        };
        self.named(r)
    }
}
