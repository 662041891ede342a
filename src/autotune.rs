//! Each convolution's algorithms chosen by measurement on the machine at hand, like cuDNN's
//! benchmark mode: every algorithm that applies is timed on the layer's forward pass, input
//! gradient and weight gradient at the run's batch size, and the fastest combination is used.
//! The choice is cached per machine (CPU model, vector width, threads, layer shape, batch) in
//! the user's cache directory, so later runs skip the timing, and a run saves the plan it used
//! so `--resume` continues with the same algorithms (bit-identical).
//!
//! Each pass is timed on cold caches, as it runs inside a step: between one step's pass through
//! a layer and the next, the rest of the step (the optimiser alone sweeps every weight, gradient
//! and moment: 1.2 GB for AlexNet) has moved more than the caches hold. Warm timings can rank
//! algorithms the other way: AlexNet's conv1 by Winograd on 4x4 blocks of pixels took 8-10 ms
//! warm against direct loops' 9-11, and 12.7-13.4 against 11.7-12.0 cold (Xeon, Emerald Rapids,
//! batch 16, forward), the step's own 12.2-13.8 against 11.0-12.2.
//!
//! A convolution that a max-pool follows runs as one pass with it where its forward runs direct
//! loops (`conv_pool`), so there the choice is between that pair and the other algorithms plus
//! the max-pool on its own: timed alone, the seed model's conv1 forward at batch 1000 took less
//! by im2col than by direct loops, but in the pass im2col and max-pool took 50 ms and the fused
//! pair 8.5 (Xeon).

use crate::files::write_atomic;
use crate::layers::conv::{Conv, relu_bias_backward};
use crate::layers::conv_algo::{self, ConvAlgo, ConvAlgos};
use crate::layers::conv_pool::{ConvPool, Kept};
use crate::layers::pool::{MaxPool, max_pool_backward, max_pool_forward};
use crate::layers::simd::L;
use crate::layers::winograd::{self, Transforms};
use crate::model::{ConvPlan, Model};
use crate::roofline::best_of_three_after_ms;
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `--conv-algo`: measure (`auto`), or force one algorithm on every layer it applies to (the
/// others keep the heuristic choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoPolicy {
    #[default]
    Auto,
    Direct,
    Im2col,
    Winograd,
}

/// Milliseconds per pass of each algorithm on one layer (absent: does not apply, or skipped as
/// far slower on a sub-batch probe).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerTimes {
    pub forward: BTreeMap<ConvAlgo, f64>,
    pub input_grad: BTreeMap<ConvAlgo, f64>,
    pub weight_grad: BTreeMap<ConvAlgo, f64>,
    /// Both gradients by one algorithm in one call, as a run makes them when their algorithms
    /// agree: they share intermediates (Winograd's transformed output gradient, taken for the
    /// seed model's conv2 in 2.2-2.9 ms less than the two alone).
    pub both_grads: BTreeMap<ConvAlgo, f64>,
    /// Winograd's transforms when forward was another algorithm: U (input gradient) and V
    /// (weight gradient).
    pub winograd_u: f64,
    pub winograd_v: f64,
    /// Where a max-pool follows: the convolution and the max-pool as one pass each way (direct
    /// loops; forward, and backward when training), and the max-pool on its own (with the
    /// ReLU mask and bias gradient, which the fused backward makes too), which every other
    /// choice adds.
    pub pooled: Option<PooledTimes>,
}

/// Milliseconds of a convolution with the max-pool after it (see `LayerTimes::pooled`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PooledTimes {
    /// Absent: skipped as far slower on a sub-batch probe.
    pub fused: Option<f64>,
    pub pool_alone: f64,
}

/// Bumped when an algorithm's kernels (or how they are timed) change, so cached choices are
/// measured again.
const KERNELS: u32 = 16;

/// A plan and where it came from.
#[derive(Clone, Debug)]
pub struct Tuned {
    pub plan: ConvPlan,
    /// "measured", "cached in PATH", "forced", ...
    pub source: String,
    /// Per convolution layer measured now: its name and times.
    pub times: Vec<(String, LayerTimes)>,
}

/// The plan for `model` at `batch` (`training`: forward and both gradients; else forward only).
pub fn choose(model: &Model, batch: usize, training: bool, policy: ConvAlgoPolicy, cache_dir: Option<&Path>) -> Result<Tuned> {
    let forced = match policy {
        ConvAlgoPolicy::Auto => None,
        ConvAlgoPolicy::Direct => Some(ConvAlgo::Direct),
        ConvAlgoPolicy::Im2col => Some(ConvAlgo::Im2col),
        ConvAlgoPolicy::Winograd => Some(ConvAlgo::Winograd),
    };
    if let Some(algo) = forced {
        let plan = model.layers.iter().map(|l| l.conv().map(|_| ConvAlgos::all(algo))).collect();
        return Ok(Tuned { plan, source: format!("--conv-algo {}", algo.name()), times: Vec::new() });
    }
    let cache_file = cache_dir.map(|d| d.join(CACHE_FILE));
    let cache = cache_file.as_deref().map(read_cache).unwrap_or_default();
    let names = model.layer_names();
    let machine = format!("{} | {L} lanes | {} threads | kernels v{KERNELS}", cpu_model(), rayon::current_num_threads());
    // The max-pool each convolution would run with (as `Workspace` fuses them).
    let pools: Vec<Option<&MaxPool>> = model
        .layers
        .iter()
        .zip(model.layers.iter().skip(1).map(Some).chain([None]))
        .map(|(l, next)| {
            let next = next.filter(|n| l.op.fuses_with(&*n.op, Some(ConvAlgos::all(ConvAlgo::Direct))))?;
            next.op.downcast::<MaxPool>()
        })
        .collect();
    let keys: Vec<Option<String>> = model
        .layers
        .iter()
        .zip(&pools)
        .enumerate()
        .map(|(i, (l, pool))| l.conv().map(|conv| cache_key(&machine, conv, *pool, batch, training, i > 0)))
        .collect();
    let (mut plan, mut times, mut new_entries) = (Vec::new(), Vec::new(), BTreeMap::new());
    let mut evict = Vec::new();
    for (i, (layer, key)) in model.layers.iter().zip(&keys).enumerate() {
        let (Some(conv), Some(key)) = (layer.conv(), key) else {
            plan.push(None);
            continue;
        };
        let algos = match cache.get(key) {
            Some(a) => *a,
            None => {
                if evict.is_empty() {
                    evict = vec![0u8; eviction_bytes()];
                }
                let mut t = measure(conv, batch, training, i > 0, &mut evict);
                if let Some(pool) = pools[i] {
                    let unfused_best = fastest_with_ms(&t, training, i > 0).0;
                    t.pooled = Some(measure_pooled(conv, pool, batch, training, i > 0, unfused_best, &mut evict));
                }
                let a = fastest(&t, training, i > 0);
                times.push((names[i].clone(), t));
                new_entries.insert(key.clone(), a);
                a
            }
        };
        plan.push(Some(algos));
    }
    let mut source = match &cache_file {
        Some(f) if times.is_empty() => format!("cached in {}", f.display()),
        _ => "measured".to_string(),
    };
    if let (Some(file), false) = (&cache_file, new_entries.is_empty()) {
        match merge_into_cache(file, &new_entries) {
            Ok(on_disk) => {
                // First writer wins: where another process cached the same key meanwhile, this
                // one adopts its choice, so every run on the machine agrees from then on.
                for (algos, key) in plan.iter_mut().zip(&keys) {
                    if let Some(key) = key {
                        *algos = on_disk.get(key).copied().or(*algos);
                    }
                }
                source = format!("measured, cached in {}", file.display());
            }
            Err(e) => eprintln!("warning: cannot cache the convolution algorithms: {e:#}"),
        }
    }
    Ok(Tuned { plan, source, times })
}

const CACHE_FILE: &str = "conv-algos.json";

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    /// What the keys mean, for a reader of the file.
    about: String,
    entries: BTreeMap<String, ConvAlgos>,
}

fn read_cache(path: &Path) -> BTreeMap<String, ConvAlgos> {
    let Ok(bytes) = std::fs::read(path) else { return BTreeMap::new() };
    match serde_json::from_slice::<CacheFile>(&bytes) {
        Ok(c) => c.entries,
        Err(e) => {
            eprintln!("warning: ignoring the unreadable algorithm cache {}: {e}", path.display());
            BTreeMap::new()
        }
    }
}

/// Add `entries` to the cache file where their keys are new, under an exclusive lock (processes
/// measuring at once do not lose or change each other's entries); returns the merged entries.
fn merge_into_cache(path: &Path, entries: &BTreeMap<String, ConvAlgos>) -> Result<BTreeMap<String, ConvAlgos>> {
    let dir = path.parent().context("cache path has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock_path = path.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", lock_path.display()))?;
    let mut on_disk = read_cache(path);
    let before = on_disk.len();
    for (key, algos) in entries {
        on_disk.entry(key.clone()).or_insert(*algos);
    }
    if on_disk.len() > before {
        let file = CacheFile {
            about: "alexnet: the fastest convolution algorithms measured on this machine, by CPU, vector width, threads, \
                    pass kind, batch and layer shape; delete to measure again"
                .into(),
            entries: on_disk.clone(),
        };
        write_atomic(path, serde_json::to_string_pretty(&file)?.as_bytes())?;
    }
    Ok(on_disk)
}

/// The CPU's model name (from /proc/cpuinfo where there is one).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `machine` (CPU model, vector width, threads), then the pass kind, batch, layer shape and
/// the max-pool it would run with.
fn cache_key(machine: &str, conv: &Conv, pool: Option<&MaxPool>, batch: usize, training: bool, input_grad: bool) -> String {
    let w = &conv.win;
    format!(
        "{machine} | {} | batch {batch} | {}x{}x{} -> {}, k{} s{} pad{} groups{}{}{}",
        match (training, input_grad) {
            (false, _) => "inference",
            (true, true) => "training",
            (true, false) => "training, no input gradient",
        },
        w.h.input,
        w.w.input,
        conv.in_c,
        conv.out_c,
        w.kernel,
        w.stride,
        w.h.pad_before,
        conv.groups,
        if conv.relu { " relu" } else { "" },
        match pool {
            Some(p) => format!(", then max-pool k{} s{} pad{}", p.win.kernel, p.win.stride, p.win.h.pad_before),
            None => String::new(),
        }
    )
}

/// Bytes written before each timed run to empty the caches: twice the last-level cache
/// (from sysfs; 32 MB where it does not say), at most 1 GB.
fn eviction_bytes() -> usize {
    let size = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok().and_then(|s| cache_size(&s));
    (2 * size.unwrap_or(32 << 20)).min(1 << 30)
}

/// Bytes of a sysfs cache size ("307200K", "32M", "512").
fn cache_size(text: &str) -> Option<usize> {
    let s = text.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let scale = match unit {
        "K" => 1 << 10,
        "M" => 1 << 20,
        "" => 1,
        _ => return None,
    };
    digits.parse::<usize>().ok().map(|n| n * scale)
}

/// `best_of_three_ms` with `evict` read and written in full before each timed run, so that it
/// starts on cold caches.
fn best_of_three_cold_ms(evict: &mut [u8], f: impl FnMut()) -> f64 {
    best_of_three_after_ms(|| evict.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().for_each(|b| *b = b.wrapping_add(1))), f)
}

/// `len` values in [-0.5, 0.5), by `seed`: inputs for the timings (speed does not depend on them).
fn test_values(len: usize, seed: u32) -> Vec<f32> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect()
}

/// Inputs for `batch` samples, weights and a zero bias to time `conv` with.
fn test_layer(conv: &Conv, batch: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = test_values(conv.weight_len(), 2).iter().map(|v| v * 0.1).collect();
    (test_values(batch * conv.in_len(), 1), w, vec![0.0; conv.out_c])
}

/// Time every algorithm that applies on every pass the run needs, each on cold caches.
/// Algorithms are tried in order of their usual speed; one whose sub-batch probe
/// (`probe_samples`) predicts more than 3x the best full-batch time so far is skipped rather than run
/// at full size (direct loops on a 227x227 layer would take seconds).
fn measure(conv: &Conv, batch: usize, training: bool, input_grad: bool, evict: &mut [u8]) -> LayerTimes {
    let (x, w, b) = test_layer(conv, batch);
    let mut y = vec![0.0; batch * conv.out_len()];
    let winograd = winograd::applies(conv);
    let mut saved = vec![0.0; if winograd { winograd::saved_len(conv, batch) } else { 0 }];
    let mut dy = test_values(batch * conv.out_len(), 3);
    let (mut dx, mut dw, mut db) = (vec![0.0; batch * conv.in_len()], vec![0.0; conv.weight_len()], vec![0.0; conv.out_c]);
    let probe = probe_samples(batch);
    let mut t = LayerTimes::default();
    let order = [ConvAlgo::Winograd, ConvAlgo::Im2col, ConvAlgo::Direct];
    // Forward, as the run's passes use Winograd's transforms: training keeps U and V for
    // backward, evaluation keeps U across passes (the best of three times the kept U).
    let (mut cached_of, mut cached_u) = (Vec::new(), vec![0.0; if winograd && !training { winograd::u_len(conv) } else { 0 }]);
    for algo in order.into_iter().filter(|a| a.applies(conv)) {
        let mut run = |n: usize, y: &mut [f32], saved: &mut Vec<f32>| {
            let transforms = match (algo, training) {
                (ConvAlgo::Winograd, true) => Transforms::Keep(saved),
                (ConvAlgo::Winograd, false) => Transforms::Cache { of: &mut cached_of, u: &mut cached_u },
                _ => Transforms::Discard,
            };
            conv_algo::forward(conv, algo, n, &x, &w, &b, y, transforms)
        };
        if let Some(ms) = worth_timing(least(&t.forward), probe, batch, |n| best_of_three_cold_ms(evict, || run(n, &mut y, &mut saved))) {
            t.forward.insert(algo, ms);
        }
    }
    if !training {
        return t;
    }
    // The transforms the Winograd gradients read, for the gradient timings below.
    if winograd {
        conv_algo::forward(conv, ConvAlgo::Winograd, batch, &x, &w, &b, &mut y, Transforms::Keep(&mut saved));
        relu_bias_backward(conv, batch, &y, &mut dy, &mut db);
        let mut scratch = saved.clone();
        t.winograd_u = best_of_three_cold_ms(evict, || winograd::prepare_backward(conv, batch, &x, &w, &mut scratch, true, false));
        t.winograd_v = best_of_three_cold_ms(evict, || winograd::prepare_backward(conv, batch, &x, &w, &mut scratch, false, true));
    }
    let saved = (winograd).then_some(&saved[..]);
    for algo in order.into_iter().filter(|a| a.applies(conv)) {
        if input_grad {
            let ms = worth_timing(least(&t.input_grad), probe, batch, |n| {
                best_of_three_cold_ms(evict, || conv_algo::gradients(conv, algo, n, &x, &w, &dy, saved, Some(&mut dx), None))
            });
            if let Some(ms) = ms {
                t.input_grad.insert(algo, ms);
            }
        }
        let ms = worth_timing(least(&t.weight_grad), probe, batch, |n| {
            best_of_three_cold_ms(evict, || conv_algo::gradients(conv, algo, n, &x, &w, &dy, saved, None, Some(&mut dw)))
        });
        if let Some(ms) = ms {
            t.weight_grad.insert(algo, ms);
        }
        if input_grad && t.input_grad.contains_key(&algo) && t.weight_grad.contains_key(&algo) {
            let ms =
                best_of_three_cold_ms(evict, || conv_algo::gradients(conv, algo, batch, &x, &w, &dy, saved, Some(&mut dx), Some(&mut dw)));
            t.both_grads.insert(algo, ms);
        }
    }
    t
}

/// Samples of the sub-batch probe that `worth_timing` scales up: a sixteenth of the batch, and
/// at least one per thread. (One per thread scaled a call's fixed cost up by the batch over the
/// threads: at inference batch 1000 the seed model's fused conv1 + pool1, 10 ms, was skipped in
/// two of four fresh measurements as predicted past 3x 30 ms.)
fn probe_samples(batch: usize) -> usize {
    (batch / 16).max(rayon::current_num_threads()).min(batch)
}

/// The least of `times` (infinite where there are none).
fn least(times: &BTreeMap<ConvAlgo, f64>) -> f64 {
    times.values().copied().fold(f64::INFINITY, f64::min)
}

/// `time(n)` at the full batch, unless a probe on `probe` samples, scaled, is over 3x `best`
/// (the best time so far).
fn worth_timing(best: f64, probe: usize, batch: usize, mut time: impl FnMut(usize) -> f64) -> Option<f64> {
    if best.is_finite() && probe < batch && time(probe) * (batch as f64 / probe as f64) > 3.0 * best {
        return None;
    }
    Some(time(batch))
}

/// The convolution with the max-pool after it: the max-pool alone, and the fused pair (direct
/// loops) unless its sub-batch probe predicts more than 3x the best unfused choice (the
/// convolution's `unfused_best` and the max-pool alone), each way the run needs, on cold caches.
fn measure_pooled(
    conv: &Conv,
    pool: &MaxPool,
    batch: usize,
    training: bool,
    input_grad: bool,
    unfused_best: f64,
    evict: &mut [u8],
) -> PooledTimes {
    let (x, w, b) = test_layer(conv, batch);
    let (y, d_pooled) = (test_values(batch * conv.out_len(), 3), test_values(batch * pool.out_len(), 4));
    let (mut pooled, mut argmax) = (vec![0.0; batch * pool.out_len()], vec![0u8; batch * pool.out_len()]);
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; conv.out_c]);
    let mut pool_alone =
        best_of_three_cold_ms(evict, || max_pool_forward(pool, batch, &y, &mut pooled, training.then_some(&mut argmax[..])));
    if training {
        let mut dy = vec![0.0; y.len()];
        pool_alone += best_of_three_cold_ms(evict, || {
            max_pool_backward(pool, batch, &d_pooled, &argmax, &mut dy);
            relu_bias_backward(conv, batch, &y, &mut dy, &mut db);
        });
    }
    // The pair's tables are built once per layer, as the layer does.
    let pair = ConvPool::<L>::new(conv, pool);
    let mut active = vec![0; batch * pair.active_words()];
    let fused = worth_timing(unfused_best + pool_alone, probe_samples(batch), batch, |n| {
        let mut ms = best_of_three_cold_ms(evict, || {
            let kept = training.then_some(Kept { argmax: &mut argmax[..], active: &mut active[..] });
            pair.forward(n, &x, &w, &b, &mut pooled, kept)
        });
        if training {
            ms += best_of_three_cold_ms(evict, || {
                let dx = input_grad.then_some(&mut dx[..]);
                pair.backward(n, &x, &w, &b, &d_pooled, &argmax, &active, dx, Some(&mut dw), &mut db)
            });
        }
        ms
    });
    PooledTimes { fused, pool_alone }
}

/// The combination with the least total time. A Winograd gradient after a forward pass of
/// another algorithm pays for the transforms it reads; gradients of one algorithm count as the
/// one call that makes both. Where a max-pool follows (`pooled`), a direct forward is the fused
/// pair, and every other forward adds the max-pool's own time.
fn fastest(t: &LayerTimes, training: bool, input_grad: bool) -> ConvAlgos {
    fastest_with_ms(t, training, input_grad).1
}

/// `fastest`'s choice and its total milliseconds.
fn fastest_with_ms(t: &LayerTimes, training: bool, input_grad: bool) -> (f64, ConvAlgos) {
    let min_of = |m: &BTreeMap<ConvAlgo, f64>| m.iter().min_by(|a, b| a.1.total_cmp(b.1)).map(|(a, _)| *a);
    let mut best = match t.pooled {
        Some(PooledTimes { fused: Some(ms), .. }) => (ms, ConvAlgos::all(ConvAlgo::Direct)),
        _ => (f64::INFINITY, ConvAlgos::all(min_of(&t.forward).unwrap_or(ConvAlgo::Im2col))),
    };
    let pool_alone = t.pooled.map_or(0.0, |p| p.pool_alone);
    let forwards = t.forward.iter().filter(|(f, _)| t.pooled.is_none() || **f != ConvAlgo::Direct);
    let dx_options: Vec<(ConvAlgo, f64)> = if input_grad { t.input_grad.iter().map(|(a, ms)| (*a, *ms)).collect() } else { vec![] };
    for (&f, &tf) in forwards {
        if !training {
            if tf + pool_alone < best.0 {
                best = (tf + pool_alone, ConvAlgos::all(f));
            }
            continue;
        }
        for (&wg, &tw) in &t.weight_grad {
            let dx_choices: Vec<(ConvAlgo, f64)> = if input_grad { dx_options.clone() } else { vec![(wg, 0.0)] };
            for (dxa, td) in dx_choices {
                let both = if input_grad && dxa == wg { t.both_grads.get(&wg) } else { None };
                let mut total = tf + pool_alone + both.copied().unwrap_or(tw + td);
                if f != ConvAlgo::Winograd {
                    total += if wg == ConvAlgo::Winograd { t.winograd_v } else { 0.0 };
                    total += if input_grad && dxa == ConvAlgo::Winograd { t.winograd_u } else { 0.0 };
                }
                if total < best.0 {
                    best = (total, ConvAlgos { forward: f, input_grad: dxa, weight_grad: wg });
                }
            }
        }
    }
    best
}

/// The plan as a run directory saves it: layer name -> algorithms.
pub fn named_plan(model: &Model, plan: &ConvPlan) -> BTreeMap<String, ConvAlgos> {
    model.layer_names().into_iter().zip(plan).filter_map(|(n, a)| a.map(|a| (n, a))).collect()
}

/// Back from `named_plan` (layers it does not name keep the heuristic choice).
pub fn plan_from_names(model: &Model, named: &BTreeMap<String, ConvAlgos>) -> ConvPlan {
    let names = model.layer_names();
    model.layers.iter().zip(names).map(|(l, n)| l.conv().and_then(|_| named.get(&n).copied())).collect()
}

/// The file in a run directory that records the algorithms the run uses.
pub const RUN_FILE: &str = "conv_algos.json";

/// The plans of a run: training at the (per-rank) batch, evaluation at the evaluation batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunPlans {
    pub training_batch: usize,
    pub training: BTreeMap<String, ConvAlgos>,
    pub evaluation_batch: usize,
    pub evaluation: BTreeMap<String, ConvAlgos>,
}

impl RunPlans {
    pub fn read(run_dir: &Path) -> Result<RunPlans> {
        let path = run_dir.join(RUN_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a convolution plan", path.display()))
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_atomic(&run_dir.join(RUN_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::architecture;

    #[test]
    fn sysfs_cache_sizes_parse() {
        assert_eq!(cache_size("307200K\n"), Some(300 << 20));
        assert_eq!(cache_size("32M"), Some(32 << 20));
        assert_eq!(cache_size("512"), Some(512));
        assert_eq!(cache_size("1G"), None);
        assert_eq!(cache_size(""), None);
    }

    #[test]
    fn the_fastest_combination_counts_winograds_transforms() {
        let ms = |pairs: &[(ConvAlgo, f64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        let (d, i, w) = (ConvAlgo::Direct, ConvAlgo::Im2col, ConvAlgo::Winograd);
        let mut t = LayerTimes {
            forward: ms(&[(i, 5.0), (w, 6.0)]),
            input_grad: ms(&[(i, 10.0), (w, 4.0), (d, 30.0)]),
            weight_grad: ms(&[(i, 8.0), (w, 7.5)]),
            both_grads: ms(&[(i, 17.0), (w, 11.5)]),
            winograd_u: 0.1,
            winograd_v: 2.0,
            pooled: None,
        };
        // im2col forward + Winograd dx (U costs 0.1) + im2col dw: 5 + 4.1 + 8 = 17.1 beats
        // Winograd throughout (6 + 11.5 for both gradients in one call = 17.5) and im2col +
        // Winograd dw (5 + 4.1 + 9.5).
        assert_eq!(fastest(&t, true, true), ConvAlgos { forward: i, input_grad: w, weight_grad: i });
        assert_eq!(fastest(&t, false, true), ConvAlgos::all(i));
        // Without an input gradient (the first layer) dx follows dw.
        assert_eq!(fastest(&t, true, false), ConvAlgos { forward: i, input_grad: i, weight_grad: i });
        // Where one call makes both gradients faster (6 + 10.9 = 16.9), Winograd throughout
        // wins, though the two gradients timed alone sum to more (4 + 7.5).
        t.both_grads.insert(w, 10.9);
        assert_eq!(fastest(&t, true, true), ConvAlgos::all(w));
    }

    /// A pass with a fixed cost per call (0.3 ms) and 10 us per sample takes 10.3 ms at batch
    /// 1000: against a best of 30 ms it is timed, where a probe of one sample per thread
    /// predicted 160 ms.
    #[test]
    fn a_fixed_cost_per_call_does_not_hide_a_fast_pass_from_its_probe() {
        let time = |n: usize| 0.3 + 0.01 * n as f64;
        assert!(probe_samples(1000) >= 62, "{}", probe_samples(1000));
        assert_eq!(worth_timing(30.0, probe_samples(1000), 1000, time), Some(time(1000)));
        assert_eq!(worth_timing(30.0, 2, 1000, time), None, "one sample per thread (2 threads) scaled the fixed cost 500x");
        // A pass that is far slower is still skipped.
        assert_eq!(worth_timing(3.0, probe_samples(1000), 1000, time), None);
    }

    /// Before a max-pool, a direct forward is the fused pair: it wins where the pair beats the
    /// best other choice plus the max-pool alone, and a direct forward timed alone (which the
    /// run would not make) is never chosen.
    #[test]
    fn before_a_max_pool_the_fused_pair_competes_with_the_rest_plus_the_pool() {
        let ms = |pairs: &[(ConvAlgo, f64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        let (d, i) = (ConvAlgo::Direct, ConvAlgo::Im2col);
        let mut t = LayerTimes {
            forward: ms(&[(d, 1.0), (i, 2.0)]),
            weight_grad: ms(&[(d, 1.0), (i, 3.0)]),
            pooled: Some(PooledTimes { fused: Some(8.5), pool_alone: 2.0 }),
            ..LayerTimes::default()
        };
        // Inference: im2col 2 + pool 2 = 4 beats the pair's 8.5 (the direct 1 alone is no choice).
        assert_eq!(fastest(&t, false, false), ConvAlgos::all(i));
        // Training: im2col 2 + pool 2 + direct dw 1 = 5 beats 8.5.
        assert_eq!(fastest(&t, true, false), ConvAlgos { forward: i, input_grad: d, weight_grad: d });
        t.pooled = Some(PooledTimes { fused: Some(3.9), pool_alone: 2.0 });
        assert_eq!(fastest(&t, false, false), ConvAlgos::all(d));
        assert_eq!(fastest(&t, true, false), ConvAlgos::all(d));
        // Skipped on its probe: never chosen.
        t.pooled = Some(PooledTimes { fused: None, pool_alone: 2.0 });
        assert_eq!(fastest(&t, false, false), ConvAlgos::all(i));
        // Without a max-pool after it, direct loops alone are a choice like any other.
        t.pooled = None;
        assert_eq!(fastest(&t, false, false), ConvAlgos::all(d));
    }

    #[test]
    fn a_measured_plan_is_cached_and_read_back_and_forcing_skips_the_timing() {
        let dir = tempfile::tempdir().unwrap();
        let model = Model::new(&architecture("alexnet-mnist", None).unwrap()).unwrap();
        let first = choose(&model, 4, true, ConvAlgoPolicy::Auto, Some(dir.path())).unwrap();
        assert_eq!(first.times.len(), 3, "three convolutions measured");
        assert!(first.source.starts_with("measured, cached in"), "{}", first.source);
        // Winograd is timed first, so never skipped; the others may be, on a slow probe.
        for (name, t) in &first.times {
            assert!(!t.forward.is_empty() && !t.weight_grad.is_empty(), "{t:?}");
            if name != "conv1" {
                for pass in [&t.forward, &t.input_grad, &t.weight_grad] {
                    assert!(pass.contains_key(&ConvAlgo::Winograd), "{name} {t:?}");
                }
            }
            assert_eq!(t.input_grad.is_empty(), name == "conv1", "the first layer has no input gradient");
            assert!(t.pooled.is_some_and(|p| p.pool_alone > 0.0), "{name}: a max-pool follows every convolution of this model");
        }
        let again = choose(&model, 4, true, ConvAlgoPolicy::Auto, Some(dir.path())).unwrap();
        assert!(again.times.is_empty() && again.source.starts_with("cached in"), "{}", again.source);
        assert_eq!(again.plan, first.plan);
        let bytes = std::fs::read(dir.path().join(CACHE_FILE)).unwrap();
        choose(&model, 4, true, ConvAlgoPolicy::Auto, Some(dir.path())).unwrap();
        assert_eq!(std::fs::read(dir.path().join(CACHE_FILE)).unwrap(), bytes, "reading the cache leaves it as it was");
        // Another batch size is another entry.
        assert_eq!(choose(&model, 2, false, ConvAlgoPolicy::Auto, Some(dir.path())).unwrap().times.len(), 3);
        let forced = choose(&model, 4, true, ConvAlgoPolicy::Im2col, None).unwrap();
        assert!(forced.times.is_empty());
        assert!(forced.plan.iter().flatten().all(|a| *a == ConvAlgos::all(ConvAlgo::Im2col)));
        assert_eq!(plan_from_names(&model, &named_plan(&model, &first.plan)), first.plan);
    }
}
