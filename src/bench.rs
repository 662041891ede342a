//! Throughput benchmark on real MNIST batches: full training steps (batch assembly, forward,
//! backward, optimiser) and inference, each the median of several timed runs after warm-up.

use crate::cluster::Single;
use crate::data::batch::{epoch_order, fill_batch};
use crate::data::mnist::Dataset;
use crate::model::{Mode, Model, Workspace, forward, train_step_gradients};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::roofline::{self, Roofline};
use std::time::Instant;

#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    pub model: String,
    pub threads: usize,
    pub train_batch: usize,
    pub train_samples_per_s: f64,
    pub train_runs: Vec<f64>,
    pub infer_batch: usize,
    pub infer_samples_per_s: f64,
    pub infer_runs: Vec<f64>,
    pub peak_rss_mib: f64,
    /// Per layer: name, forward ms and backward ms per training step (with `layers`).
    pub layer_ms: Vec<(String, f64, f64)>,
    /// Optimiser update and batch assembly ms per step (with `layers`).
    pub update_ms: f64,
    /// Per layer: inference forward ms per batch of `infer_batch` (with `layers`).
    pub infer_layer_ms: Vec<f64>,
    /// The GEMM ceilings of training and inference on this machine (with `roofline`).
    pub roofline: Vec<Roofline>,
    /// One core's FMA peak in GFLOP/s (with `roofline`).
    pub fma_peak_gflops: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub struct BenchPlan {
    pub train_batch: usize,
    pub infer_batch: usize,
    pub runs: usize,
    pub steps_per_run: usize,
    /// Also time each layer (adds a little overhead to the totals).
    pub layers: bool,
    /// Also measure the GEMM ceilings (`roofline::measure`), first, on a quiet machine.
    pub roofline: bool,
}

pub fn run(model: &mut Model, opt_cfg: OptimizerConfig, data: &Dataset, plan: &BenchPlan) -> BenchResult {
    let threads = rayon::current_num_threads();
    let (roofline, fma_peak_gflops) = if plan.roofline {
        let ceilings =
            vec![roofline::measure(model, plan.train_batch, true, threads), roofline::measure(model, plan.infer_batch, false, threads)];
        (ceilings, Some(roofline::fma_peak_gflops()))
    } else {
        (Vec::new(), None)
    };
    let order = epoch_order(data.len(), 1, 0);
    let mut ws = Workspace::new(model, plan.train_batch, true);
    let mut opt = Optimizer::new(opt_cfg, &model.params);
    let mut labels = Vec::new();
    let mut cursor = 0;
    let mut step = |model: &mut Model, ws: &mut Workspace| {
        if cursor + plan.train_batch > order.len() {
            cursor = 0;
        }
        fill_batch(data, &order[cursor..cursor + plan.train_batch], 0, 0, ws.input_mut(), &mut labels);
        cursor += plan.train_batch;
        train_step_gradients(model, ws, &labels, Mode::Train { stream: cursor as u64, first_sample: 0 }, &mut Single);
        opt.update(&mut model.params, opt_cfg.lr);
    };
    for _ in 0..3 {
        step(model, &mut ws);
    }
    let mut layer_ms = Vec::new();
    let mut update_ms = 0.0;
    if plan.layers {
        ws.layer_seconds = Some(vec![(0.0, 0.0); model.layers.len()]);
        let steps = plan.steps_per_run;
        let mut upd = 0.0;
        for _ in 0..steps {
            let t = Instant::now();
            step(model, &mut ws);
            upd += t.elapsed().as_secs_f64();
        }
        let times = ws.layer_seconds.take().expect("profiling on");
        let per = |s: f64| 1e3 * s / steps as f64;
        let names = crate::summary::layer_names(model);
        layer_ms = names.into_iter().zip(&times).map(|(n, &(f, b))| (n, per(f), per(b))).collect();
        update_ms = per(upd) - layer_ms.iter().map(|(_, f, b)| f + b).sum::<f64>();
    }
    let mut train_runs: Vec<f64> = (0..plan.runs)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..plan.steps_per_run {
                step(model, &mut ws);
            }
            (plan.steps_per_run * plan.train_batch) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    drop(ws);

    let mut ews = Workspace::new(model, plan.infer_batch, false);
    let il = data.image_len();
    let n = plan.infer_batch.min(data.len());
    ews.input_mut()[..n * il].copy_from_slice(&data.images[..n * il]);
    forward(model, &mut ews, n, Mode::Eval);
    let mut infer_runs: Vec<f64> = (0..plan.runs)
        .map(|_| {
            let t = Instant::now();
            forward(model, &mut ews, n, Mode::Eval);
            forward(model, &mut ews, n, Mode::Eval);
            (2 * n) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    let mut infer_layer_ms = Vec::new();
    if plan.layers {
        ews.layer_seconds = Some(vec![(0.0, 0.0); model.layers.len()]);
        forward(model, &mut ews, n, Mode::Eval);
        infer_layer_ms = ews.layer_seconds.take().expect("profiling on").iter().map(|(f, _)| 1e3 * f).collect();
    }
    BenchResult {
        model: model.arch.name.clone(),
        threads,
        train_batch: plan.train_batch,
        train_samples_per_s: median(&mut train_runs.clone()),
        train_runs: std::mem::take(&mut train_runs),
        infer_batch: n,
        infer_samples_per_s: median(&mut infer_runs.clone()),
        infer_runs: std::mem::take(&mut infer_runs),
        peak_rss_mib: peak_rss_mib(),
        layer_ms,
        update_ms,
        infer_layer_ms,
        roofline,
        fma_peak_gflops,
    }
}
