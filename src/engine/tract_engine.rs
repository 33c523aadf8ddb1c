//! Pure-Rust back end on `tract-onnx`. The frozen graph is optimised for a
//! batch of one image of `imgsz`; a batch runs its images on rayon's threads,
//! since one tract plan is single-threaded and can be shared between threads.

use anyhow::{Context, Result};
use ndarray::{ArrayD, ArrayView4, Axis};
use rayon::prelude::*;
use tract_onnx::prelude::*;

use super::EngineOptions;

pub struct TractEngine {
    plan: std::sync::Arc<TypedRunnableModel>,
    pool: rayon::ThreadPool,
}

impl TractEngine {
    pub fn new(frozen: &[u8], imgsz: usize, opts: &EngineOptions) -> Result<TractEngine> {
        let mut model = tract_onnx::onnx().model_for_read(&mut &frozen[..]).context("tract cannot read the graph")?;
        // Shape annotations carried over from the export (symbolic `batch`,
        // simplifier value_info) would contradict the fixed input; tract infers
        // every shape again from the input.
        for id in 0..model.nodes().len() {
            for slot in 0..model.node(id).outputs.len() {
                model.set_outlet_fact(OutletId::new(id, slot), InferenceFact::default())?;
            }
        }
        let plan = model
            .with_input_fact(0, f32::fact([1, 3, imgsz, imgsz]).into())?
            .into_optimized()
            .context("tract cannot optimise the graph")?
            .into_runnable()?;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads()).build()?;
        Ok(TractEngine { plan, pool })
    }

    pub fn run(&mut self, batch: ArrayView4<f32>) -> Result<Vec<ArrayD<f32>>> {
        let per_image: Vec<Vec<ArrayD<f32>>> = self.pool.install(|| {
            batch
                .axis_iter(Axis(0))
                .into_par_iter()
                .map(|img| {
                    let input: Tensor = img.insert_axis(Axis(0)).to_owned().into();
                    let out = self.plan.run(tvec!(input.into()))?;
                    out.iter().map(|t| Ok(t.to_plain_array_view::<f32>()?.to_owned())).collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let levels = per_image.first().map(Vec::len).unwrap_or(0);
        (0..levels)
            .map(|l| {
                let views: Vec<_> = per_image.iter().map(|o| o[l].view()).collect();
                Ok(ndarray::concatenate(Axis(0), &views)?)
            })
            .collect()
    }
}
