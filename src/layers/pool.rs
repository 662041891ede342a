//! Max pooling over NHWC with any window and stride, VALID / TF SAME / explicit padding.
//!
//! Padded positions never win (TensorFlow's SAME pooling ignores them rather than treating
//! them as zeros). The forward pass records each output's argmax so the backward pass routes
//! the gradient to exactly that input, as TF and PyTorch do.

use super::aligned::AlignedBuf;
use super::layer::{Backward, Forward, Layer, Saved, Spec};
use super::simd::{for_lane_blocks, is_nonzero, window_max_arg};
use super::{Padding, Window, WindowTable};
use crate::onnx_graph::{OnnxGraph, ints};
use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaxPoolSpec {
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
}

#[derive(Clone, Copy, Debug)]
pub struct MaxPool {
    pub win: Window,
    pub channels: usize,
}

impl Spec for MaxPoolSpec {
    fn resolve(&self, [h, w, c]: [usize; 3]) -> Result<Arc<dyn Layer>> {
        if self.kernel > MAX_KERNEL {
            bail!("a {0}x{0} max-pool: windows are at most {MAX_KERNEL}x{MAX_KERNEL} (each output's argmax is one byte)", self.kernel);
        }
        let Some(win) = Window::new(h, w, self.kernel, self.stride, self.padding) else {
            bail!("a {0}x{0} max-pool does not fit input {h}x{w}x{c}", self.kernel);
        };
        Ok(Arc::new(MaxPool { win, channels: c }))
    }
}

impl Layer for MaxPool {
    fn kind(&self) -> &'static str {
        "pool"
    }

    fn output_shape(&self) -> [usize; 3] {
        [self.win.h.output, self.win.w.output, self.channels]
    }

    fn saved(&self, batch: usize, training: bool, _: Option<super::conv_algo::ConvAlgos>) -> Saved {
        if training { Saved::Argmax(AlignedBuf::zeroed(batch * self.out_len())) } else { Saved::None }
    }

    fn forward(&self, f: Forward) {
        // An evaluation workspace keeps no indices.
        let argmax = match f.saved {
            Saved::Argmax(idx) => Some(&mut idx[..]),
            _ => None,
        };
        max_pool_forward(self, f.n, f.x, f.y, argmax);
    }

    fn backward(&self, b: Backward) {
        let (Some(dx), Saved::Argmax(idx)) = (b.dx, &b.saved) else { return };
        max_pool_backward(self, b.n, b.dy, idx, dx);
    }

    fn onnx(&self, graph: &mut OnnxGraph, name: &str, input: String, _: &[&str]) -> String {
        let win = &self.win;
        let attrs =
            vec![ints("kernel_shape", &[win.kernel, win.kernel]), ints("strides", &[win.stride, win.stride]), ints("pads", &win.onnx_pads())];
        graph.node("MaxPool", name, vec![input], attrs)
    }
}

impl MaxPool {
    pub fn in_len(&self) -> usize {
        self.win.in_pixels() * self.channels
    }
    pub fn out_len(&self) -> usize {
        self.win.out_pixels() * self.channels
    }
}

/// `argmax[i]` receives the tap (ky * k + kx) of output `i`'s window that it copied: one
/// byte, a quarter of the memory traffic of a pixel offset. Inference passes no `argmax`: the
/// indices then go to a per-thread buffer that stays in cache instead of a batch-sized one
/// that costs memory bandwidth (50 MB for the seed model's pool1 at batch 1000).
pub fn max_pool_forward(p: &MaxPool, batch: usize, input: &[f32], output: &mut [f32], argmax: Option<&mut [u8]>) {
    let y = &mut output[..batch * p.out_len()];
    let windows = p.win.table();
    let sample = |n: usize, y: &mut [f32], idx: &mut [u8]| pool_sample(p, &windows, &input[n * p.in_len()..(n + 1) * p.in_len()], y, idx);
    match argmax {
        Some(a) => y
            .par_chunks_mut(p.out_len())
            .zip(a[..batch * p.out_len()].par_chunks_mut(p.out_len()))
            .enumerate()
            .for_each(|(n, (y, idx))| sample(n, y, idx)),
        None => y.par_chunks_mut(p.out_len()).enumerate().for_each_init(|| vec![0u8; p.out_len()], |idx, (n, y)| sample(n, y, idx)),
    }
}

fn pool_sample(p: &MaxPool, windows: &WindowTable, x: &[f32], y: &mut [f32], idx: &mut [u8]) {
    let c = p.channels;
    windows.for_each(|o, taps| pool_window(x, taps, c, false, &mut y[o * c..(o + 1) * c], &mut idx[o * c..(o + 1) * c]));
}

/// Max and argmax over the window `taps` (tap, input pixel) of input `x` with `c` channels,
/// into one output pixel's `y` and `idx`. With `nowhere_at_zero`, a maximum of 0 or less gets
/// the argmax `NOWHERE` (for a fused convolution whose ReLU zeroed it: its gradient is 0).
pub(super) fn pool_window(x: &[f32], taps: &[(usize, usize)], c: usize, nowhere_at_zero: bool, y: &mut [f32], idx: &mut [u8]) {
    // 4L, L or 1 channels at a time in registers (max and argmax as lane-wise selects),
    // stored once: conditional stores would become slow masked moves, and a pass over the
    // stored row would wait for its cache lines.
    for_lane_blocks!(0..c, |cb, N| pool_block::<N>(x, taps, cb, c, nowhere_at_zero, &mut y[cb..], &mut idx[cb..]));
}

/// Max and argmax over the window `taps` (tap, input pixel) of channels `cb..cb + N`.
#[inline(always)]
fn pool_block<const N: usize>(x: &[f32], taps: &[(usize, usize)], cb: usize, c: usize, nowhere_at_zero: bool, y: &mut [f32], idx: &mut [u8]) {
    let (y, idx) = ((&mut y[..N]).try_into().expect("N"), (&mut idx[..N]).try_into().expect("N"));
    window_max_arg::<N>(x, taps, c, cb, nowhere_at_zero.then_some(NOWHERE), y, idx);
}

/// Overwrites `d_input` with the gradient routed from `d_output` through the recorded argmax.
pub fn max_pool_backward(p: &MaxPool, batch: usize, d_output: &[f32], argmax: &[u8], d_input: &mut [f32]) {
    let inverse = p.win.inverse_table();
    d_input[..batch * p.in_len()].par_chunks_mut(p.in_len()).enumerate().for_each(|(n, dx)| {
        let at = n * p.out_len()..(n + 1) * p.out_len();
        max_pool_backward_sample(p, &inverse, &d_output[at.clone()], &argmax[at], dx, |_, _| {});
    });
}

/// An argmax no input pixel has: an output marked so sends no gradient back.
pub(super) const NOWHERE: u8 = u8::MAX;

/// The largest max-pool window: its taps and `NOWHERE` fit a byte.
pub(super) const MAX_KERNEL: usize = 15;

/// Overwrite one sample's `dx` with the gradient that the pooled gradient `dy` sends back
/// through its argmax `idx`. Gathered, not scattered: each input pixel sums, in output
/// order, the gradients of the windows (`inverse`, from `Window::inverse_table`) that took
/// their maximum there, in registers, 4L, L or 1 channels at a time, so every row is written
/// once and nothing needs zeroing first. The sums are those of scattering in output order.
/// `row_written(pixel, whether any of its row is nonzero)` follows each row (-0 counts as zero;
/// the fused convolution backward lists the nonzero rows, the only ones it reads again).
pub(super) fn max_pool_backward_sample(
    p: &MaxPool,
    inverse: &WindowTable,
    dy: &[f32],
    idx: &[u8],
    dx: &mut [f32],
    mut row_written: impl FnMut(usize, bool),
) {
    let c = p.channels;
    inverse.for_each(|i, windows| {
        let row = &mut dx[i * c..(i + 1) * c];
        let mut nonzero = false;
        for_lane_blocks!(0..c, |cb, N| nonzero |= gather_block::<N>(windows, c, cb, dy, idx, &mut row[cb..]));
        row_written(i, nonzero);
    });
}

/// `max_pool_backward_sample` for channels `cb..cb + N` of the input pixel whose `windows`
/// are given: returns whether any sum is nonzero (-0 counts as zero).
#[inline(always)]
fn gather_block<const N: usize>(windows: &[(usize, usize)], c: usize, cb: usize, dy: &[f32], idx: &[u8], dx: &mut [f32]) -> bool {
    let mut sum = [0.0f32; N];
    for &(tap, o) in windows {
        let (at, tap) = (o * c + cb, tap as u8);
        let g: &[f32; N] = dy[at..at + N].try_into().expect("N channels");
        let arg: &[u8; N] = idx[at..at + N].try_into().expect("N channels");
        // Lane masks as bits (all ones or zero), which LLVM keeps in vector registers where
        // it would take bools one lane at a time.
        for l in 0..N {
            let mask = ((arg[l] == tap) as u32).wrapping_neg();
            sum[l] += f32::from_bits(g[l].to_bits() & mask);
        }
    }
    dx[..N].copy_from_slice(&sum);
    // A lane-wise test and an OR of the masks (an OR of the bits took ten instructions).
    sum.iter().fold(false, |any, &v| any | is_nonzero(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Padding;
    use crate::layers::testing::{check_grad, random_vec};

    fn pool(h: usize, w: usize, c: usize) -> MaxPool {
        MaxPool { win: Window::new(h, w, 3, 2, Padding::Same).unwrap(), channels: c }
    }

    #[test]
    fn windows_beyond_a_byte_of_taps_are_refused_by_name() {
        let spec = |kernel| MaxPoolSpec { kernel, stride: 1, padding: Padding::Valid };
        assert!(spec(MAX_KERNEL).resolve([32, 32, 3]).is_ok());
        let Err(err) = spec(MAX_KERNEL + 1).resolve([32, 32, 3]) else { panic!("a 16x16 max-pool resolved") };
        let err = err.to_string();
        assert!(err.contains("16x16 max-pool"), "{err}");
    }

    #[test]
    fn tf_same_pool_pads_only_at_the_end_for_even_input() {
        // 4x4 input 0..15, k=3 s=2 SAME: out 2x2, pad (0,1). Windows: rows {0,1,2},{2,3}.
        // TF gives [[10, 11], [14, 15]].
        let p = pool(4, 4, 1);
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let (mut y, mut idx) = (vec![0.0; 4], vec![0; 4]);
        max_pool_forward(&p, 1, &x, &mut y, Some(&mut idx));
        assert_eq!(y, vec![10.0, 11.0, 14.0, 15.0]);
        assert_eq!(idx, vec![8, 7, 5, 4], "the taps (ky * 3 + kx) of 10, 11, 14, 15 in their windows");
    }

    #[test]
    fn tf_same_pool_pads_both_sides_for_odd_input_and_ignores_padding() {
        // 3x3 input of negatives, k=3 s=2 SAME: out 2x2, pad (1,1); the padding must not win
        // with 0. Windows: rows {0,1},{1,2} (the padded row is skipped).
        let p = pool(3, 3, 1);
        let x: Vec<f32> = vec![-9., -8., -7., -6., -5., -4., -3., -2., -1.];
        let (mut y, mut idx) = (vec![0.0; 4], vec![0; 4]);
        max_pool_forward(&p, 1, &x, &mut y, Some(&mut idx));
        assert_eq!(y, vec![-5.0, -4.0, -2.0, -1.0]);
        // 7 -> 4 pads (1,1): first window covers rows 0..=1, last rows 5..=6.
        let p7 = pool(7, 7, 1);
        let x7: Vec<f32> = (0..49).map(|v| v as f32).collect();
        let (mut y7, mut i7) = (vec![0.0; 16], vec![0; 16]);
        max_pool_forward(&p7, 1, &x7, &mut y7, Some(&mut i7));
        assert_eq!(&y7[..4], &[8.0, 10.0, 12.0, 13.0]);
        assert_eq!(y7[15], 48.0);
    }

    /// Against a naive max and first-argmax over each window, on values with many ties and on
    /// 83 channels, so that every block width runs (4L, L and single channels).
    #[test]
    fn forward_matches_naive_max_and_first_argmax() {
        let p = pool(9, 8, 83);
        let batch = 2;
        let x: Vec<f32> = random_vec(batch * p.in_len(), 13).iter().map(|v| (v * 4.0).round()).collect();
        let (mut y, mut idx) = (vec![0.0; batch * p.out_len()], vec![0; batch * p.out_len()]);
        max_pool_forward(&p, batch, &x, &mut y, Some(&mut idx));
        for n in 0..batch {
            p.win.for_each_window(|o, taps| {
                for ch in 0..p.channels {
                    let (mut best, mut arg) = (f32::NEG_INFINITY, taps[0].0);
                    for &(tap, i) in taps {
                        let v = x[n * p.in_len() + i * p.channels + ch];
                        if v > best {
                            (best, arg) = (v, tap);
                        }
                    }
                    let at = n * p.out_len() + o * p.channels + ch;
                    assert_eq!((y[at], idx[at] as usize), (best, arg), "sample {n}, output {o}, channel {ch}");
                }
            });
        }
    }

    #[test]
    fn backward_routes_to_argmax_and_matches_finite_differences() {
        // 3 channels take the one-channel blocks; 70 the 4L- and L-channel blocks too.
        for c in [3, 70] {
            let p = pool(7, 6, c);
            let batch = 2;
            let x = random_vec(batch * p.in_len(), 11);
            let r = random_vec(batch * p.out_len(), 12);
            let forward = |x: &[f32]| {
                let (mut y, mut idx) = (vec![0.0; batch * p.out_len()], vec![0; batch * p.out_len()]);
                max_pool_forward(&p, batch, x, &mut y, Some(&mut idx));
                (y, idx)
            };
            let (_, idx) = forward(&x);
            let mut dx = vec![0.0; x.len()];
            max_pool_backward(&p, batch, &r, &idx, &mut dx);
            check_grad("maxpool dx", &x, &dx, |x| forward(x).0.iter().zip(&r).map(|(a, b)| (*a as f64) * (*b as f64)).sum());
        }
    }
}
