//! `freezesplit demo [--json]`: the whole job on the built-in example.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::EngineArgs;
use crate::demo::{self, DemoOptions};

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "runs/demo")]
    pub project: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Print the before and after metrics as one JSON object
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let r = demo::run(&DemoOptions { project: a.project, epochs: a.epochs, engine: a.engine.options(), progress: !a.json })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("\nnew class set (3 colours instead of 9 colour+shape classes), class rows trained, box and objectness rows kept:");
    println!("{:<28} {:>10} {:>10}", "", "before", "after");
    for (name, b, a) in [
        ("mAP50", r.before.map50, r.after.map50),
        ("mAP50-95", r.before.map, r.after.map),
        ("class-agnostic mAP50", r.before.agnostic_map50, r.after.agnostic_map50),
        ("matched-box class accuracy", r.before.matched_class_accuracy, r.after.matched_class_accuracy),
    ] {
        println!("{name:<28} {b:>10.4} {a:>10.4}");
    }
    println!("fine-tuned model: {}", r.exported.display());
    println!("annotated val images: {}", r.predictions.display());
    println!("demo finished in {:.1}s; run directory {}", r.seconds, r.run.display());
    Ok(())
}
