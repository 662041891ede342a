//! Local response normalisation across channels with `tf.nn.lrn` semantics:
//!
//! `out[c] = x[c] / (bias + alpha * sum_{j=c-r..c+r} x[j]^2) ^ beta`, r = depth_radius.
//!
//! Other frameworks' LRN (PyTorch `nn.LocalResponseNorm`, ONNX `LRN`, Caffe) take a window
//! `size = 2r + 1` and divide alpha by the size: theirs `alpha = ours * size`, `k = bias`. The
//! seed model's `alpha = 0.001 / 9, r = 4` is PyTorch's `LocalResponseNorm(9, alpha=0.001,
//! beta=0.75, k=1)`. The paper's formula sums without dividing, like TF: its `n = 5, alpha = 1e-4,
//! k = 2` is ours `r = 2, alpha = 1e-4, bias = 2` and PyTorch's `LocalResponseNorm(5, alpha=5e-4,
//! beta=0.75, k=2)`.

use super::conv_algo::ConvAlgos;
use super::layer::{Backward, Forward, Layer, Saved, Spec};
use super::simd::{L, Lanes, load, store};
use crate::onnx_graph::{OnnxGraph, float, int};
use anyhow::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The layer kind's spec (and the kernels' parameters).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrnParams {
    pub depth_radius: usize,
    pub bias: f32,
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Debug)]
pub struct Lrn {
    pub params: LrnParams,
    /// Per-sample height, width, channels (in and out).
    pub shape: [usize; 3],
}

impl Spec for LrnParams {
    fn resolve(&self, shape: [usize; 3]) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Lrn { params: *self, shape }))
    }
}

impl Lrn {
    fn len(&self, n: usize) -> usize {
        n * self.shape.iter().product::<usize>()
    }
}

impl Layer for Lrn {
    fn kind(&self) -> &'static str {
        "lrn"
    }

    fn output_shape(&self) -> [usize; 3] {
        self.shape
    }

    fn saved(&self, batch: usize, training: bool, _: Option<ConvAlgos>) -> Saved {
        if training { Saved::Values(vec![0.0; self.len(batch)]) } else { Saved::None }
    }

    fn forward(&self, f: Forward) {
        let len = self.len(f.n);
        let scale = f.saved.values().map(|s| &mut s[..len]);
        lrn_forward(&self.params, self.shape[2], &f.x[..len], &mut f.y[..len], scale);
    }

    fn backward(&self, b: Backward) {
        let (Some(dx), Saved::Values(scale)) = (b.dx, &b.saved) else { return };
        let len = self.len(b.n);
        lrn_backward(&self.params, self.shape[2], &b.x[..len], &b.y[..len], &scale[..len], &b.dy[..len], &mut dx[..len]);
    }

    /// ONNX's (and PyTorch's) alpha is ours times the window size.
    fn onnx(&self, graph: &mut OnnxGraph, name: &str, input: String, _: &[&str]) -> String {
        let p = &self.params;
        let size = 2 * p.depth_radius + 1;
        let attrs =
            vec![int("size", size as i64), float("alpha", p.alpha * size as f32), float("beta", p.beta), float("bias", p.bias)];
        graph.node("LRN", name, vec![input], attrs)
    }
}

/// Evaluate `$body` with `$f` bound to `s -> s^-beta`, the common exponents done by square
/// roots, which vectorise (powf does not). The choice is made once, outside the loops: inside
/// them LLVM would if-convert the branch and evaluate the (pure) powf for every element.
macro_rules! with_inv_pow {
    ($beta:expr, $f:ident => $body:expr) => {
        if $beta == 0.75 {
            let $f = |s: f32| {
                let r = s.sqrt();
                1.0 / (r * r.sqrt())
            };
            $body
        } else if $beta == 0.5 {
            let $f = |s: f32| 1.0 / s.sqrt();
            $body
        } else {
            let beta = $beta;
            let $f = |s: f32| s.powf(-beta);
            $body
        }
    };
}

/// Windowed sums of squares: `scale[c] = bias + alpha * sum_{|j-c|<=r} x[j]^2` for one pixel.
fn window_scale(p: &LrnParams, x: &[f32], sq: &mut [f32], scale: &mut [f32]) {
    let (c, r) = (x.len(), p.depth_radius);
    sq[..r].fill(0.0);
    sq[r + c..].fill(0.0);
    for (s, v) in sq[r..r + c].iter_mut().zip(x) {
        *s = v * v;
    }
    window_sums::<L>(sq, 2 * r + 1, scale);
    for s in scale.iter_mut() {
        *s = p.bias + p.alpha * *s;
    }
}

/// `sums[i] = v[i] + v[i + 1] + ... + v[i + width - 1]`, added in that order, N at a time in
/// registers (summed in place, each of the width passes would store and reload every sum).
fn window_sums<const N: usize>(v: &[f32], width: usize, sums: &mut [f32]) {
    let full = sums.len() - sums.len() % N;
    for i in (0..full).step_by(N) {
        let sum = (0..width).fold(Lanes::<N>::default(), |acc, d| acc + load::<N>(v, i + d));
        store(sums, i, sum);
    }
    for (i, s) in sums.iter_mut().enumerate().skip(full) {
        *s = v[i..i + width].iter().fold(0.0, |acc, x| acc + x);
    }
}

/// `len` values of `channels`-long pixel vectors. `scale` keeps the denominators' bases for
/// the backward pass.
/// Inference passes no `scale`: each task's bases then stay in a small buffer in cache.
pub fn lrn_forward(p: &LrnParams, channels: usize, input: &[f32], output: &mut [f32], scale: Option<&mut [f32]>) {
    let pixels_per_task = 64;
    let chunk = channels * pixels_per_task;
    let pixels = |y: &mut [f32], s: &mut [f32], x: &[f32]| {
        with_inv_pow!(p.beta, inv_pow => {
            let mut sq = vec![0.0; channels + 2 * p.depth_radius];
            for ((y, s), x) in y.chunks_exact_mut(channels).zip(s.chunks_exact_mut(channels)).zip(x.chunks_exact(channels)) {
                window_scale(p, x, &mut sq, s);
                for ((y, s), x) in y.iter_mut().zip(s.iter()).zip(x) {
                    *y = x * inv_pow(*s);
                }
            }
        })
    };
    match scale {
        Some(scale) => output
            .par_chunks_mut(chunk)
            .zip(scale.par_chunks_mut(chunk))
            .zip(input.par_chunks(chunk))
            .for_each(|((y, s), x)| pixels(y, s, x)),
        None => output
            .par_chunks_mut(chunk)
            .zip(input.par_chunks(chunk))
            .for_each_init(|| vec![0.0; chunk], |s, (y, x)| pixels(y, &mut s[..y.len()], x)),
    }
}

/// `d_input[i] = d_out[i] * scale[i]^-beta
///   - 2 alpha beta x[i] * sum_{|j-i|<=r} d_out[j] * out[j] / scale[j]`
/// (using `x[j] * scale[j]^(-beta-1) = out[j] / scale[j]`). Overwrites `d_input`.
pub fn lrn_backward(p: &LrnParams, channels: usize, input: &[f32], output: &[f32], scale: &[f32], d_output: &[f32], d_input: &mut [f32]) {
    let chunk = channels * 64;
    let r = p.depth_radius;
    with_inv_pow!(p.beta, inv_pow => {
        d_input.par_chunks_mut(chunk).enumerate().for_each(|(t, dx)| {
            let o = t * chunk;
            let mut tbuf = vec![0.0; channels + 2 * r];
            let mut acc = vec![0.0; channels];
            for (px, dx) in dx.chunks_exact_mut(channels).enumerate() {
                let b = o + px * channels;
                let (x, y, s, dy) = (&input[b..b + channels], &output[b..b + channels], &scale[b..b + channels], &d_output[b..b + channels]);
                for (((t, dy), y), s) in tbuf[r..r + channels].iter_mut().zip(dy).zip(y).zip(s) {
                    *t = dy * y / s;
                }
                window_sums::<L>(&tbuf, 2 * r + 1, &mut acc);
                let k = 2.0 * p.alpha * p.beta;
                for ((((dx, dy), s), x), a) in dx.iter_mut().zip(dy).zip(s).zip(x).zip(&acc) {
                    *dx = dy * inv_pow(*s) - k * x * a;
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{check_grad, random_vec};

    #[test]
    fn matches_hand_worked_tf_values() {
        // One pixel, 3 channels [1, 2, 3], r=1, bias=1, alpha=0.5, beta=0.75:
        // sums of squares over windows: [1+4, 1+4+9, 4+9] = [5, 14, 13]
        // scale = 1 + 0.5*sum = [3.5, 8, 7.5]; out = x * scale^-0.75.
        let p = LrnParams { depth_radius: 1, bias: 1.0, alpha: 0.5, beta: 0.75 };
        let x = [1.0, 2.0, 3.0];
        let (mut y, mut s) = ([0.0; 3], [0.0; 3]);
        lrn_forward(&p, 3, &x, &mut y, Some(&mut s));
        assert_eq!(s, [3.5, 8.0, 7.5]);
        let want = [1.0 / 3.5f32.powf(0.75), 2.0 / 8.0f32.powf(0.75), 3.0 / 7.5f32.powf(0.75)];
        // 3.5^-0.75 = 0.39079, 8^-0.75 = 0.21022 (x2 = 0.42045), 7.5^-0.75 = 0.22065 (x3 = 0.66195)
        for ((a, b), hand) in y.iter().zip(want).zip([0.39079, 0.42045, 0.66195]) {
            assert!((a - b).abs() < 1e-6 && (a - hand).abs() < 1e-5, "{a} vs {b} vs {hand}");
        }
    }

    #[test]
    fn window_sums_match_a_plain_loop_at_both_widths() {
        let v = random_vec(64 + 23 + 8, 3);
        for width in [1, 3, 5, 9] {
            for len in [3, 16, 64, 87] {
                let naive: Vec<f32> = (0..len).map(|i| (0..width).fold(0.0, |a, d| a + v[i + d])).collect();
                let (mut s8, mut s16) = (vec![0.0; len], vec![0.0; len]);
                window_sums::<8>(&v, width, &mut s8);
                window_sums::<16>(&v, width, &mut s16);
                assert_eq!((&s8, &s16), (&naive, &naive), "width {width}, {len} channels");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for p in [
            LrnParams { depth_radius: 4, bias: 1.0, alpha: 0.001 / 9.0, beta: 0.75 },
            LrnParams { depth_radius: 2, bias: 2.0, alpha: 0.3, beta: 0.75 },
            LrnParams { depth_radius: 1, bias: 0.5, alpha: 0.2, beta: 0.6 },
        ] {
            // 11 channels take the one-lane tail of the window sums, 37 the vector blocks too.
            for c in [11, 37] {
                let x: Vec<f32> = random_vec(c * 130, 21).iter().map(|v| v * 2.0).collect();
                let r = random_vec(x.len(), 22);
                let fwd = |x: &[f32]| {
                    let (mut y, mut s) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                    lrn_forward(&p, c, x, &mut y, Some(&mut s));
                    (y, s)
                };
                let (y, s) = fwd(&x);
                let mut dx = vec![0.0; x.len()];
                lrn_backward(&p, c, &x, &y, &s, &r, &mut dx);
                check_grad("lrn dx", &x, &dx, |x| fwd(x).0.iter().zip(&r).map(|(a, b)| (*a as f64) * (*b as f64)).sum());
            }
        }
    }
}
