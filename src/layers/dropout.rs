//! Inverted dropout: at training time each activation is kept with probability `keep` and
//! scaled by `1 / keep`, so evaluation needs no rescaling (the notebook's `tf.nn.dropout`).
//!
//! Each sample draws its mask from its own generator, seeded by the caller's stream (run
//! seed, step and layer) and the sample's index in the batch: masks do not depend on how the
//! batch is split across threads.

use super::conv_algo::ConvAlgos;
use super::layer::{Backward, Forward, Layer, Mode, Saved, Spec};
use crate::onnx_graph::OnnxGraph;
use crate::rng::{stream_id, substream};
use anyhow::Result;
use rand_xoshiro::rand_core::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Dropout's spec. Its keep probability is training configuration (`Mode::Train`), not part of
/// the architecture. (Files from before carry a `keep` field here, ignored.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropoutSpec {}

#[derive(Debug)]
pub struct Dropout {
    pub shape: [usize; 3],
}

impl Spec for DropoutSpec {
    fn resolve(&self, shape: [usize; 3]) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Dropout { shape }))
    }
}

impl Layer for Dropout {
    fn kind(&self) -> &'static str {
        "dropout"
    }

    fn output_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn saved(&self, batch: usize, training: bool, _: Option<ConvAlgos>) -> Saved {
        if training { Saved::Mask { kept: vec![0; batch * self.shape.iter().product::<usize>()], scale: 1.0 } } else { Saved::None }
    }

    /// Evaluation and keep 1 skip the layer rather than copy its input.
    fn is_identity(&self, mode: Mode) -> bool {
        !matches!(mode, Mode::Train { keep, .. } if keep < 1.0)
    }

    fn forward(&self, f: Forward) {
        let Mode::Train { stream, first_sample, keep } = f.mode else { unreachable!("dropout is skipped at evaluation") };
        let Saved::Mask { kept, scale } = f.saved else { unreachable!("a training workspace keeps the mask") };
        let per_sample = self.shape.iter().product::<usize>();
        let len = f.n * per_sample;
        let stream = stream_id(&[stream, f.index as u64]);
        *scale = dropout_forward(keep, per_sample, stream, first_sample, &f.x[..len], &mut f.y[..len], &mut kept[..len]);
    }

    fn backward(&self, b: Backward) {
        let (Some(dx), Saved::Mask { kept, scale }) = (b.dx, &b.saved) else { return };
        let len = b.n * self.shape.iter().product::<usize>();
        dropout_backward(&kept[..len], *scale, &b.dy[..len], &mut dx[..len]);
    }

    /// The identity at inference.
    fn onnx(&self, _: &mut OnnxGraph, _: &str, input: String, _: &[&str]) -> String {
        input
    }
}

/// Elements per block of draws in `dropout_forward`.
const BLOCK: usize = 256;

/// `output = input * mask`, the mask 1/keep (returned) where `kept` receives 1 and 0 where it
/// receives 0. Sample `n` of the batch draws from generator `first_sample + n` of `stream`.
pub fn dropout_forward(
    keep: f32,
    per_sample: usize,
    stream: u64,
    first_sample: usize,
    input: &[f32],
    output: &mut [f32],
    kept: &mut [u8],
) -> f32 {
    // Four 16-bit uniforms per 64-bit draw, compared with keep * 2^16: exact for keep = 1, and
    // keep resolved to 1/65536, far finer than any meaningful difference.
    let threshold = (keep as f64 * 65536.0).round() as u32;
    let scale = 1.0 / keep;
    // `move`: borrowed, `threshold` and `scale` were read through a pointer the stores below
    // might alias, so LLVM kept the mask loop scalar, with a branch on each random bit, where
    // it could not use AVX-512's masked loads: 10x slower on AVX2 (the seed model's first
    // dropout, 64 x 14 x 14 x 64 floats on two Zen 4 threads, warm: 1.70 -> 0.17 ms in an
    // 8-lane build), and 1.6x with AVX-512 (0.28 -> 0.17).
    output.par_chunks_mut(per_sample).zip(kept.par_chunks_mut(per_sample)).zip(input.par_chunks(per_sample)).enumerate().for_each(
        move |(n, ((y, k), x))| {
            let mut rng = substream(stream, (first_sample + n) as u64);
            // The draws for a block first (the generator is a chain of dependent steps), then
            // the block's masks and products in one loop that vectorises.
            let mut uniforms = [0u16; BLOCK];
            for ((y, k), x) in y.chunks_mut(BLOCK).zip(k.chunks_mut(BLOCK)).zip(x.chunks(BLOCK)) {
                for u in uniforms[..x.len().div_ceil(4) * 4].chunks_exact_mut(4) {
                    let bits = rng.next_u64();
                    u.iter_mut().enumerate().for_each(|(k, u)| *u = (bits >> (16 * k)) as u16);
                }
                for (((y, k), x), &u) in y.iter_mut().zip(k.iter_mut()).zip(x).zip(&uniforms) {
                    *k = u8::from((u as u32) < threshold);
                    *y = x * mask_value(*k, scale);
                }
            }
        },
    );
    scale
}

/// The mask's value for a `kept` byte: `scale` or 0. Multiplying by it, not selecting the
/// product or 0, keeps IEEE's zeros and NaNs (-x * 0 = -0, NaN * 0 = NaN), as the mask of
/// values did.
#[inline(always)]
fn mask_value(kept: u8, scale: f32) -> f32 {
    if kept != 0 { scale } else { 0.0 }
}

/// `d_input = d_output * mask`, the mask given by `kept` and `scale` as `dropout_forward` made it.
pub fn dropout_backward(kept: &[u8], scale: f32, d_output: &[f32], d_input: &mut [f32]) {
    d_input.par_chunks_mut(1 << 14).zip(d_output.par_chunks(1 << 14)).zip(kept.par_chunks(1 << 14)).for_each(move |((dx, dy), k)| {
        for ((dx, dy), &k) in dx.iter_mut().zip(dy).zip(k) {
            *dx = dy * mask_value(k, scale);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_expected_fraction_scaled_and_routes_gradients_through_the_mask() {
        let n = 200_000;
        let x = vec![1.0f32; n];
        let (mut y, mut m) = (vec![0.0; n], vec![0; n]);
        let scale = dropout_forward(0.8, 1000, 7, 0, &x, &mut y, &mut m);
        assert_eq!(scale, 1.25);
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.8).abs() < 0.005, "kept {kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.25).abs() < 1e-6));
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "inverted dropout keeps the mean: {mean}");
        let mut dx = vec![0.0; n];
        dropout_backward(&m, scale, &x, &mut dx);
        assert_eq!(dx, y, "d(x*mask)/dx = mask");
        dropout_forward(1.0, 1000, 7, 0, &x, &mut y, &mut m);
        assert!(y.iter().all(|&v| v == 1.0));
    }

    /// The blocked draws give the masks of the plain loop: one 64-bit draw per four elements,
    /// its 16-bit quarters in order, for sample sizes that end inside a block and a draw.
    #[test]
    fn blocked_draws_match_one_draw_per_four_elements() {
        for per_sample in [1, 5, 256, 1001] {
            let n = 3;
            let x: Vec<f32> = (0..per_sample * n).map(|i| i as f32 - 7.0).collect();
            let (mut y, mut m) = (vec![0.0; x.len()], vec![0; x.len()]);
            dropout_forward(0.6, per_sample, 11, 2, &x, &mut y, &mut m);
            let threshold = (0.6f64 * 65536.0).round() as u32;
            for s in 0..n {
                let mut rng = substream(11, (2 + s) as u64);
                let mut bits = 0;
                for i in 0..per_sample {
                    if i % 4 == 0 {
                        bits = rng.next_u64();
                    }
                    let kept = ((bits >> (16 * (i % 4))) & 0xffff) < threshold as u64;
                    let expect = if kept { 1.0 / 0.6f32 } else { 0.0 };
                    let at = s * per_sample + i;
                    assert_eq!((m[at], y[at]), (u8::from(kept), x[at] * expect), "sample {s} element {i} of {per_sample}");
                }
            }
        }
    }

    #[test]
    fn a_batch_split_in_two_draws_the_whole_batchs_masks() {
        let (per_sample, n) = (100, 10);
        let x: Vec<f32> = (0..per_sample * n).map(|i| i as f32).collect();
        let (mut y, mut m) = (vec![0.0; x.len()], vec![0; x.len()]);
        dropout_forward(0.5, per_sample, 3, 0, &x, &mut y, &mut m);
        let half = x.len() / 2;
        let (mut y2, mut m2) = (vec![0.0; x.len()], vec![0; x.len()]);
        dropout_forward(0.5, per_sample, 3, 0, &x[..half], &mut y2[..half], &mut m2[..half]);
        dropout_forward(0.5, per_sample, 3, n / 2, &x[half..], &mut y2[half..], &mut m2[half..]);
        assert_eq!((y, m), (y2, m2));
    }
}
