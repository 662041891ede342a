//! Throughput benchmark on real MNIST batches: full training steps (batch assembly, forward,
//! backward, optimiser) and inference, each the median of several timed runs after warm-up.

use crate::autotune::{self, ConvAlgoPolicy, LayerTimes};
use crate::cluster::Single;
use crate::data::batch::{epoch_order, fill_batch};
use crate::data::mnist::Dataset;
use crate::layers::conv_algo::ConvAlgos;
use crate::layers::linear::FullyConnected;
use crate::layers::linear::linear_forward;
use crate::model::{Mode, Model, Workspace, forward, train_step_gradients};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::roofline::{self, Roofline};
use crate::steal;
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
    /// The share of CPU time the hypervisor gave to other work during each timed run (empty
    /// where the system does not say): a slow run with a high steal is the host's doing.
    pub train_runs_steal: Vec<f64>,
    pub infer_runs_steal: Vec<f64>,
    /// Peak resident memory of the training and inference runs (not of the timings before them).
    pub peak_rss_mib: f64,
    /// Per layer: name, forward ms and backward ms per training step (with `layers`).
    pub layer_ms: Vec<(String, f64, f64)>,
    /// Optimiser update and batch assembly ms per step (with `layers`).
    pub update_ms: f64,
    /// Per layer with GEMMs (with `layers` and `roofline`): its training GEMMs' ceiling and its
    /// training time (forward + backward) over that ceiling, measured in the same rounds.
    pub layer_ceiling: Vec<LayerCeiling>,
    /// Per layer: inference forward ms per batch of `infer_batch` (with `layers`).
    pub infer_layer_ms: Vec<f64>,
    /// The GEMM ceilings of training and inference on this machine (with `roofline`).
    pub roofline: Vec<Roofline>,
    /// One core's FMA peak in GFLOP/s (with `roofline`).
    pub fma_peak_gflops: Option<f64>,
    /// The vector code paths: the widest FMA the CPU has, and the lanes of the engine's own
    /// (non-GEMM) kernels as compiled.
    pub isa: String,
    pub kernel_lanes: usize,
    /// Whether the computing threads flush denormals to zero.
    pub denormals_flushed: bool,
    /// Time of the first fully connected layer's forward pass on denormal inputs over its time
    /// on normal inputs: ~1 where flush-to-zero works, up to 4x+ where it does not.
    pub denormal_slowdown: f64,
    /// Each convolution's algorithms for training and for inference, and how they were chosen.
    pub conv_algos_training: std::collections::BTreeMap<String, ConvAlgos>,
    pub conv_algos_inference: std::collections::BTreeMap<String, ConvAlgos>,
    /// The layers a training step runs in one pass with the layer after them (`Layer::fuses_with`).
    pub fused: Vec<String>,
    /// The same for inference.
    pub fused_inference: Vec<String>,
    pub conv_algo_source: String,
    /// The measurements behind a choice made now: per layer, ms per pass and algorithm.
    pub conv_algo_times: Vec<(String, LayerTimes)>,
}

/// One layer's training time against its own im2col GEMMs at the ceiling.
#[derive(Debug, serde::Serialize)]
pub struct LayerCeiling {
    pub layer: String,
    /// The layer's training GEMMs on `threads` cores at one core's rate (median round), ms.
    pub ceiling_ms: f64,
    /// Forward + backward ms over `ceiling_ms`, the median of the rounds' ratios.
    pub ratio: f64,
    /// The lowest and the highest of the rounds' ratios: how far the host moved them.
    pub ratio_range: [f64; 2],
}

/// Rounds of per-layer timing with `--layers --roofline`: each round times the training steps'
/// layers and then their GEMMs' ceiling, so that each ratio compares figures taken seconds
/// apart (a shared VM's speed moves by up to 2x between minutes: one ceiling timed before all
/// the layers put a layer at 1.25x in one run and 0.73x in the next), and the median is
/// reported.
const LAYER_ROUNDS_WITH_CEILING: usize = 3;

/// One round of per-layer timing: each layer's forward and backward ms per step, the rest of
/// the step, and (with the roofline) the training ceiling measured right after.
struct LayerRound {
    times: Vec<(f64, f64)>,
    rest: f64,
    ceiling: Option<Roofline>,
}

/// What `time_layers` measured: medians over its rounds.
#[derive(Default)]
struct LayerTiming {
    /// Per layer: name, forward ms and backward ms per training step.
    layer_ms: Vec<(String, f64, f64)>,
    /// The rest of the step (optimiser update, batch assembly).
    update_ms: f64,
    layer_ceiling: Vec<LayerCeiling>,
    /// The training ceiling of the round with the median total (with the roofline).
    train_ceiling: Option<Roofline>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Forget this process's peak resident memory so far (Linux's `clear_refs` 5; elsewhere, or
/// where it is refused, nothing), so `peak_rss_mib` reads the peak from here on.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
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
    /// Dropout's keep probability in the training steps.
    pub keep_prob: f32,
    pub infer_batch: usize,
    pub runs: usize,
    pub steps_per_run: usize,
    /// Also time each layer (adds a little overhead to the totals).
    pub layers: bool,
    /// Also measure the GEMM ceilings (`roofline::measure`): first, on a quiet machine, or for
    /// training with `layers` in the per-layer rounds (`time_layers`).
    pub roofline: bool,
    /// How the convolutions' algorithms are chosen, and where measured ones are cached.
    pub conv_algo: ConvAlgoPolicy,
    pub cache_dir: Option<std::path::PathBuf>,
}

pub fn run(model: &mut Model, opt_cfg: OptimizerConfig, data: &Dataset, plan: &BenchPlan) -> anyhow::Result<BenchResult> {
    let threads = rayon::current_num_threads();
    // With `layers`, the training ceiling is timed in the per-layer rounds instead.
    let mut train_ceiling = (plan.roofline && !plan.layers).then(|| roofline::measure(model, plan.train_batch, true, threads));
    let infer_ceiling = plan.roofline.then(|| roofline::measure(model, plan.infer_batch, false, threads));
    let fma_peak_gflops = plan.roofline.then(roofline::fma_peak_gflops);
    let tuned_train = autotune::choose(model, plan.train_batch, true, plan.conv_algo, plan.cache_dir.as_deref())?;
    let tuned_infer = autotune::choose(model, plan.infer_batch.min(data.len()), false, plan.conv_algo, plan.cache_dir.as_deref())?;
    // The peak memory reported is the runs' own: timing the algorithms on cold caches writes
    // twice the last-level cache (600 MB on the Xeon) first.
    reset_peak_rss();
    let order = epoch_order(data.len(), 1, 0);
    let mut ws = Workspace::with_conv_plan(model, plan.train_batch, true, tuned_train.plan.clone());
    let mut opt = Optimizer::new(opt_cfg, &model.params);
    let mut labels = Vec::new();
    let mut cursor = 0;
    let mut step = |model: &mut Model, ws: &mut Workspace| {
        if cursor + plan.train_batch > order.len() {
            cursor = 0;
        }
        fill_batch(data, &order[cursor..cursor + plan.train_batch], 0, 0, ws.input_mut(), &mut labels);
        cursor += plan.train_batch;
        train_step_gradients(model, ws, &labels, Mode::Train { stream: cursor as u64, first_sample: 0, keep: plan.keep_prob }, &mut Single);
        opt.update(&mut model.params, opt_cfg.lr);
    };
    for _ in 0..3 {
        step(model, &mut ws);
    }
    let layers = if plan.layers { time_layers(model, &mut ws, plan, threads, &mut step) } else { LayerTiming::default() };
    train_ceiling = train_ceiling.or(layers.train_ceiling);
    let (mut train_runs, train_runs_steal) = timed_runs(plan.runs, || {
        let t = Instant::now();
        for _ in 0..plan.steps_per_run {
            step(model, &mut ws);
        }
        (plan.steps_per_run * plan.train_batch) as f64 / t.elapsed().as_secs_f64()
    });
    // What the training steps ran (a fused pair runs direct loops whatever the plan said).
    let conv_algos_training = autotune::named_plan(model, &ws.conv_plan);
    let fused_names = |ws: &Workspace| model.layers.iter().zip(&ws.fused).filter(|(_, f)| **f).map(|(l, _)| l.name.clone()).collect();
    let fused = fused_names(&ws);
    drop(ws);

    let mut ews = Workspace::with_conv_plan(model, plan.infer_batch, false, tuned_infer.plan.clone());
    let il = data.image_len();
    let n = plan.infer_batch.min(data.len());
    ews.input_mut()[..n * il].copy_from_slice(&data.images[..n * il]);
    forward(model, &mut ews, n, Mode::Eval);
    let (mut infer_runs, infer_runs_steal) = timed_runs(plan.runs, || {
        let t = Instant::now();
        forward(model, &mut ews, n, Mode::Eval);
        forward(model, &mut ews, n, Mode::Eval);
        (2 * n) as f64 / t.elapsed().as_secs_f64()
    });
    let mut infer_layer_ms = Vec::new();
    if plan.layers {
        ews.layer_seconds = Some(vec![(0.0, 0.0); model.layers.len()]);
        forward(model, &mut ews, n, Mode::Eval);
        infer_layer_ms = ews.layer_seconds.take().expect("profiling on").iter().map(|(f, _)| 1e3 * f).collect();
    }
    Ok(BenchResult {
        model: model.arch.name.clone(),
        threads,
        train_batch: plan.train_batch,
        train_samples_per_s: median(&mut train_runs.clone()),
        train_runs: std::mem::take(&mut train_runs),
        infer_batch: n,
        infer_samples_per_s: median(&mut infer_runs.clone()),
        infer_runs: std::mem::take(&mut infer_runs),
        train_runs_steal,
        infer_runs_steal,
        peak_rss_mib: peak_rss_mib(),
        layer_ms: layers.layer_ms,
        update_ms: layers.update_ms,
        layer_ceiling: layers.layer_ceiling,
        infer_layer_ms,
        roofline: train_ceiling.into_iter().chain(infer_ceiling).collect(),
        fma_peak_gflops,
        isa: roofline::fma_isa().to_string(),
        kernel_lanes: crate::layers::simd::L,
        denormals_flushed: crate::denormals::denormals_flushed(),
        denormal_slowdown: denormal_slowdown(model),
        conv_algos_training,
        fused,
        fused_inference: fused_names(&ews),
        conv_algos_inference: autotune::named_plan(model, &ews.conv_plan),
        conv_algo_source: tuned_train.source,
        conv_algo_times: tuned_train.times.into_iter().chain(tuned_infer.times).collect(),
    })
}

/// Each layer's forward and backward ms per training step, the rest of the step, and (with the
/// roofline) the training ceiling and each layer's ratio to its own part of it.
fn time_layers(
    model: &mut Model,
    ws: &mut Workspace,
    plan: &BenchPlan,
    threads: usize,
    step: &mut dyn FnMut(&mut Model, &mut Workspace),
) -> LayerTiming {
    let rounds = if plan.roofline { LAYER_ROUNDS_WITH_CEILING } else { 1 };
    let per = |s: f64| 1e3 * s / plan.steps_per_run as f64;
    let mut rounds_ms: Vec<LayerRound> = Vec::new();
    for _ in 0..rounds {
        ws.layer_seconds = Some(vec![(0.0, 0.0); model.layers.len()]);
        let t = Instant::now();
        for _ in 0..plan.steps_per_run {
            step(model, ws);
        }
        let total = per(t.elapsed().as_secs_f64());
        let times: Vec<(f64, f64)> = ws.layer_seconds.take().expect("profiling on").iter().map(|&(f, b)| (per(f), per(b))).collect();
        let rest = total - times.iter().map(|(f, b)| f + b).sum::<f64>();
        let ceiling = plan.roofline.then(|| roofline::measure(model, plan.train_batch, true, threads));
        rounds_ms.push(LayerRound { times, rest, ceiling });
    }
    let median_of = |f: &dyn Fn(&LayerRound) -> Option<f64>| {
        let mut v: Vec<f64> = rounds_ms.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let names = model.layer_names();
    let layer_ms = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), median_of(&|r| Some(r.times[i].0)).unwrap_or(0.0), median_of(&|r| Some(r.times[i].1)).unwrap_or(0.0)))
        .collect();
    let ceiling_of = |r: &LayerRound, i: usize| r.ceiling.as_ref()?.layer_ms.iter().find(|(l, _)| *l == i).map(|&(_, ms)| ms);
    let layer_ceiling = (0..names.len())
        .filter_map(|i| {
            let ceiling_ms = median_of(&|r| ceiling_of(r, i))?;
            // Rounds with this layer's ceiling: at least one, as `ceiling_ms` is there.
            let mut ratios: Vec<f64> =
                rounds_ms.iter().filter_map(|r| ceiling_of(r, i).map(|c| (r.times[i].0 + r.times[i].1) / c)).collect();
            let ratio = median(&mut ratios);
            let ratio_range = [ratios[0], ratios[ratios.len() - 1]];
            Some(LayerCeiling { layer: names[i].clone(), ceiling_ms, ratio, ratio_range })
        })
        .collect();
    let update_ms = median_of(&|r| Some(r.rest)).unwrap_or(0.0);
    let mut ceilings: Vec<Roofline> = rounds_ms.into_iter().filter_map(|r| r.ceiling).collect();
    ceilings.sort_by(|a, b| a.one_core_ms.total_cmp(&b.one_core_ms));
    let train_ceiling = (!ceilings.is_empty()).then(|| ceilings.swap_remove(ceilings.len() / 2));
    LayerTiming { layer_ms, update_ms, layer_ceiling, train_ceiling }
}

/// `runs` results of `run`, and the hypervisor's steal during each (empty where unknown).
fn timed_runs(runs: usize, mut run: impl FnMut() -> f64) -> (Vec<f64>, Vec<f64>) {
    let (results, steals): (Vec<f64>, Vec<Option<f64>>) = (0..runs).map(|_| steal::measure(&mut run)).unzip();
    (results, steals.into_iter().collect::<Option<Vec<f64>>>().unwrap_or_default())
}

/// Steal above this share of CPU time makes timings unreliable: a run then measures the host's
/// other tenants as much as this program.
const NOISY_STEAL: f64 = 0.05;

/// The human-readable report of `r` for `model` (`data`: what it ran on), as `bench` prints it.
pub fn report(r: &BenchResult, model: &Model, data: &str, runs: usize, steps: usize, layers: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    writeln!(out, "model {}, {} threads, {data}", r.model, r.threads).unwrap();
    writeln!(
        out,
        "vector code: {} FMA, {}-lane kernels; denormals {} (a layer on denormal inputs takes {:.2}x its time on normal ones)",
        r.isa,
        r.kernel_lanes,
        if r.denormals_flushed { "flushed to zero" } else { "NOT flushed" },
        r.denormal_slowdown
    )
    .unwrap();
    writeln!(out, "convolution algorithms ({}):", r.conv_algo_source).unwrap();
    // A fused pair runs in one pass, sample by sample; `--layers` times it as its first layer.
    for (what, plan, fused) in [("training", &r.conv_algos_training, &r.fused), ("inference", &r.conv_algos_inference, &r.fused_inference)]
    {
        let m_plan = crate::autotune::plan_from_names(model, plan);
        let fused: Vec<bool> = model.layers.iter().map(|l| fused.contains(&l.name)).collect();
        writeln!(out, "  {what}: {}", model.describe_plan(&m_plan, &fused)).unwrap();
    }
    writeln!(out, "training:  {:.0} samples/s (batch {}, median of {runs} runs of {steps} steps)", r.train_samples_per_s, r.train_batch)
        .unwrap();
    writeln!(out, "inference: {:.0} samples/s (batch {}, median of {runs} runs)", r.infer_samples_per_s, r.infer_batch).unwrap();
    if let (Some(train), Some(infer)) = (range_of(&r.train_runs_steal), range_of(&r.infer_runs_steal)) {
        let percent = |(lo, hi): (f64, f64)| format!("{:.1}-{:.1}%", 100.0 * lo, 100.0 * hi);
        write!(out, "hypervisor steal: {} of CPU time in the training runs, {} in the inference runs", percent(train), percent(infer))
            .unwrap();
        if train.1.max(infer.1) > NOISY_STEAL {
            write!(out, " (the host ran other work on these CPUs: timings are unreliable)").unwrap();
        }
        writeln!(out).unwrap();
    }
    writeln!(out, "peak memory: {:.0} MiB", r.peak_rss_mib).unwrap();
    for (what, rf) in ["training", "inference"].iter().zip(&r.roofline) {
        writeln!(
        out,
            "GEMM ceiling, {what}: {:.0} samples/s ({:.1} GFLOP of im2col GEMMs per batch of {} take {:.0} ms on one core, {:.0} GFLOP/s, x {} threads)",
            rf.ceiling_samples_per_s, rf.gflop, rf.batch, rf.one_core_ms, rf.one_core_gflops, rf.threads
        ).unwrap();
    }
    if let Some(peak) = r.fma_peak_gflops {
        writeln!(out, "one core's FMA peak: {peak:.0} GFLOP/s").unwrap();
    }
    if layers {
        writeln!(out, "milliseconds per training step (batch {}) and per inference batch ({}):", r.train_batch, r.infer_batch).unwrap();
        let infer_ceiling = |i: usize| {
            let rf = r.roofline.iter().find(|rf| !rf.training)?;
            rf.layer_ms.iter().find(|(l, _)| *l == i).map(|(_, ms)| format!("{ms:.2}"))
        };
        let with_ceiling = !r.roofline.is_empty();
        write!(out, "{:<10} {:>9} {:>9} {:>10}", "layer", "forward", "backward", "inference").unwrap();
        if with_ceiling {
            write!(out, " {:>13} {:>7} {:>11} {:>14}", "im2col train", "ratio", "(range)", "im2col infer").unwrap();
        }
        writeln!(out, "  algorithms (training; inference)").unwrap();
        for (i, ((name, f, b), inf)) in r.layer_ms.iter().zip(&r.infer_layer_ms).enumerate() {
            write!(out, "{name:<10} {f:>9.2} {b:>9.2} {inf:>10.2}").unwrap();
            if with_ceiling {
                let dash = || "-".to_string();
                let train = r.layer_ceiling.iter().find(|c| c.layer == *name);
                let (ceiling, ratio, range) = train.map_or((dash(), dash(), dash()), |c| {
                    let [low, high] = c.ratio_range;
                    (format!("{:.2}", c.ceiling_ms), format!("{:.2}x", c.ratio), format!("({low:.2}-{high:.2})"))
                });
                write!(out, " {ceiling:>13} {ratio:>7} {range:>11} {:>14}", infer_ceiling(i).unwrap_or_else(dash)).unwrap();
            }
            match (r.conv_algos_training.get(name), r.conv_algos_inference.get(name)) {
                (Some(t), Some(e)) => writeln!(out, "  {}; fwd {}", t.describe(), e.forward.name()).unwrap(),
                _ => writeln!(out).unwrap(),
            }
        }
        writeln!(out, "{:<10} {:>9.2}  (optimiser update, batch assembly)", "other", r.update_ms).unwrap();
        if with_ceiling {
            writeln!(
                out,
                "(ratio: forward + backward over the im2col GEMMs' ceiling, the median of {LAYER_ROUNDS_WITH_CEILING} rounds that each time the layers and then their GEMMs, and in brackets the lowest and highest round's; layer times are the median round's)"
            )
            .unwrap();
        }
    }
    out
}

/// Smallest and largest of `v`, if any.
fn range_of(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().reduce(f64::min)?;
    Some((lo, v.iter().copied().fold(lo, f64::max)))
}

/// The first fully connected layer's forward pass at batch 64 on inputs of 1e-39 (denormal)
/// over the same on inputs of 1.0, best of three each: the cost of denormals that flush-to-zero
/// removes (trained weights and late activations hold such values).
fn denormal_slowdown(model: &Model) -> f64 {
    let Some((linear, param)) = model.layers.iter().find_map(|l| l.op.downcast::<FullyConnected>().map(|fc| (fc.linear, l.params.start)))
    else {
        return 1.0;
    };
    let (w, b) = (&model.params[param].value, &model.params[param + 1].value);
    let batch = 64;
    let mut y = vec![0.0; batch * linear.out_len];
    let mut time = |value: f32| {
        let x = vec![std::hint::black_box(value); batch * linear.in_len];
        roofline::best_of_three_ms(|| linear_forward(&linear, batch, &x, w, b, &mut y))
    };
    let normal = time(1.0);
    time(1e-39) / normal
}
