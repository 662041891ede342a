//! The GEMM roofline of a model on this machine: how fast one training step (or one inference
//! batch) could possibly run if every convolution were plain im2col + GEMM and nothing but the
//! GEMMs took time. It is the yardstick the speed targets are quoted against ("the GEMM ceiling
//! is ~1,000-1,100 samples/s"), measured here instead of assumed, so a number from one machine
//! can be carried to another: the ceiling moves with the vector unit (AVX2 vs AVX-512), and so
//! does every framework's throughput.

use crate::layers::gemm::{Operand, matmul};
use crate::model::Model;
use serde::Serialize;
use std::time::Instant;

/// Rows (batch x output pixels) timed per GEMM; larger ones are timed at this size and scaled,
/// as the engine itself runs them in chunks.
const MAX_ROWS: usize = 16384;

#[derive(Debug, Serialize)]
pub struct Roofline {
    pub batch: usize,
    pub training: bool,
    /// Multiply-adds x 2 of all the step's GEMMs.
    pub gflop: f64,
    /// Their time on one core (single-threaded `gemm` crate, best of three).
    pub one_core_ms: f64,
    pub one_core_gflops: f64,
    /// `threads` cores each running whole steps at that rate: samples/s.
    pub ceiling_samples_per_s: f64,
    pub threads: usize,
    /// Per layer with GEMMs (by layer index): its GEMMs' ms on `threads` cores at this rate.
    pub layer_ms: Vec<(usize, f64)>,
}

/// One core's peak, to show how far the GEMMs are from the hardware: twelve independent chains
/// of fused multiply-adds at the widest vector width the CPU has (16 lanes with AVX-512, 8 with
/// AVX2 + FMA), enough to cover the FMA latency on two pipes, run for ~0.1-0.2 s. Written with
/// the ISA's intrinsics, chosen at run time, so the probe does not depend on how LLVM
/// vectorises a loop (an array-of-`mul_add` version measured 2 GFLOP/s on a Zen 4). The best of
/// three runs, as the GEMMs it is compared with are timed: one run that shared its core with
/// another process read 59 GFLOP/s on a core that peaks at 117.
pub fn fma_peak_gflops() -> f64 {
    (0..3).map(|_| fma_chains()).map(|(flop, seconds)| flop / seconds / 1e9).fold(0.0, f64::max)
}

/// The widest FMA this CPU runs: "avx512", "avx2+fma" or "scalar".
pub fn fma_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
    }
    "scalar"
}

const FMA_ITERS: usize = 5_000_000;

/// (flops, seconds) of the probe at the widest width.
fn fma_chains() -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        match fma_isa() {
            // SAFETY: each arm runs only where the CPU reports the features it is compiled for.
            "avx512" => return unsafe { fma_chains_avx512() },
            "avx2+fma" => return unsafe { fma_chains_avx2() },
            _ => {}
        }
    }
    let mut acc = [0.0f32; 12];
    let (b, c) = (std::hint::black_box(0.999_999f32), std::hint::black_box(1e-6f32));
    let t = Instant::now();
    for _ in 0..FMA_ITERS / 8 {
        acc.iter_mut().for_each(|x| *x = x.mul_add(b, c));
    }
    std::hint::black_box(&acc);
    ((FMA_ITERS / 8 * 12 * 2) as f64, t.elapsed().as_secs_f64())
}

/// Twelve register-resident chains of `$fma` over `$lanes`-wide vectors.
#[cfg(target_arch = "x86_64")]
macro_rules! fma_probe {
    ($name:ident, $features:literal, $lanes:expr, $set1:ident, $fma:ident, $store:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name() -> (f64, f64) {
            use std::arch::x86_64::*;
            let (b, c) = ($set1(std::hint::black_box(0.999_999f32)), $set1(std::hint::black_box(1e-6f32)));
            let mut acc = [$set1(0.0); 12];
            let t = Instant::now();
            for _ in 0..FMA_ITERS {
                for a in acc.iter_mut() {
                    *a = $fma(*a, b, c);
                }
            }
            let seconds = t.elapsed().as_secs_f64();
            let mut out = [0.0f32; $lanes];
            for a in acc {
                // SAFETY: `out` holds one vector.
                unsafe { $store(out.as_mut_ptr(), a) };
                std::hint::black_box(&out);
            }
            ((FMA_ITERS * 12 * $lanes * 2) as f64, seconds)
        }
    };
}
#[cfg(target_arch = "x86_64")]
fma_probe!(fma_chains_avx512, "avx512f", 16, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
#[cfg(target_arch = "x86_64")]
fma_probe!(fma_chains_avx2, "avx2,fma", 8, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps);

/// Best of three timed runs of `f`, in ms, after one untimed run that warms caches and
/// scratch buffers: how every kernel timing here is taken (GEMMs, convolution algorithms, the
/// denormal check).
pub fn best_of_three_ms(f: impl FnMut()) -> f64 {
    best_of_three_after_ms(|| {}, f)
}

/// `best_of_three_ms` with `before` run, untimed, ahead of each timed run (to empty the caches,
/// say).
pub fn best_of_three_after_ms(mut before: impl FnMut(), mut f: impl FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            before();
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// One GEMM: `m x k` times `k x n`, counted `repeat` times (chunks of a larger one).
struct Shape {
    layer: usize,
    m: usize,
    n: usize,
    k: usize,
    repeat: f64,
}

/// The GEMMs of one step with every convolution as im2col: the forward product, and when
/// training the weight gradient and (past the first layer) the input gradient.
fn im2col_gemms(model: &Model, batch: usize, training: bool) -> Vec<Shape> {
    let mut shapes = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        let Some([groups, rows, n, k]) = layer.op.gemm(batch) else { continue };
        let m = rows.min(MAX_ROWS);
        let repeat = (groups * rows) as f64 / m as f64;
        shapes.push(Shape { layer: i, m, n, k, repeat });
        if training {
            shapes.push(Shape { layer: i, m: k, n, k: m, repeat });
            if i > 0 {
                shapes.push(Shape { layer: i, m, n: k, k: n, repeat });
            }
        }
    }
    shapes
}

/// Time the step's GEMMs on the calling thread and scale to `threads` cores.
pub fn measure(model: &Model, batch: usize, training: bool, threads: usize) -> Roofline {
    let shapes = im2col_gemms(model, batch, training);
    let mut seconds = 0.0;
    let mut flop = 0.0;
    let mut layer_ms: Vec<(usize, f64)> = Vec::new();
    for s in &shapes {
        let a: Vec<f32> = (0..s.m * s.k).map(|i| (i % 17) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..s.k * s.n).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut c = vec![0.0; s.m * s.n];
        let t =
            best_of_three_ms(|| matmul(s.m, s.n, s.k, Operand::new(&a, s.k), Operand::new(&b, s.n), &mut c, s.n, false)) / 1e3 * s.repeat;
        seconds += t;
        flop += 2.0 * (s.m * s.n * s.k) as f64 * s.repeat;
        match layer_ms.last_mut() {
            Some((l, ms)) if *l == s.layer => *ms += t * 1e3 / threads as f64,
            _ => layer_ms.push((s.layer, t * 1e3 / threads as f64)),
        }
    }
    Roofline {
        batch,
        training,
        gflop: flop / 1e9,
        one_core_ms: seconds * 1e3,
        one_core_gflops: flop / seconds / 1e9,
        ceiling_samples_per_s: (threads * batch) as f64 / seconds,
        threads,
        layer_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::architecture;

    #[test]
    fn counts_the_seed_models_training_flops() {
        // By hand, per sample: conv1 784*64*9*2 = 0.903M, conv2 196*128*576*2 = 28.901M, conv3
        // 49*256*1152*2 = 28.901M, fc1 4096*1024*2 = 8.389M, fc2 2.097M, fc3 0.020M: 69.21M
        // forward (../shared/README.md: 69.2). Training is three times that less conv1's input
        // gradient, which no one needs (the shared README's 207.6 counts it).
        let model = Model::new(&architecture("alexnet-mnist", None).unwrap()).unwrap();
        let flop =
            |training| im2col_gemms(&model, 10, training).iter().map(|s| 2.0 * (s.m * s.n * s.k) as f64 * s.repeat).sum::<f64>() / 10.0;
        assert!((flop(false) / 1e6 - 69.21).abs() < 0.01, "{}", flop(false));
        assert!((flop(true) / 1e6 - (3.0 * 69.21 - 0.903)).abs() < 0.02, "{}", flop(true));
    }
}
