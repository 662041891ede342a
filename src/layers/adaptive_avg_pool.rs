//! Adaptive average pooling (PyTorch's `AdaptiveAvgPool2d`): averages the input over a fixed
//! grid of output cells, whatever the input's size, so the classifier after it sees the same
//! shape at any input resolution. torchvision's AlexNet pools to 6x6 before its classifier.
//!
//! Output cell `i` of an axis of `input` into `output` averages input positions
//! `floor(i * input / output) .. ceil((i + 1) * input / output)`: PyTorch's windows, which
//! overlap when the sizes do not divide and repeat the input when it is smaller than the output.

use super::layer::{Backward, Forward, Layer, Mode, Spec};
use crate::onnx_graph::OnnxGraph;
use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveAvgPoolSpec {
    /// Output height and width.
    pub output: [usize; 2],
}

#[derive(Debug)]
pub struct AdaptiveAvgPool {
    /// Per-sample input height, width, channels.
    pub input: [usize; 3],
    pub output: [usize; 2],
}

impl Spec for AdaptiveAvgPoolSpec {
    fn resolve(&self, input: [usize; 3]) -> Result<Arc<dyn Layer>> {
        let [oh, ow] = self.output;
        if oh == 0 || ow == 0 || oh > 1 << 12 || ow > 1 << 12 {
            bail!("adaptive average pooling to {oh}x{ow}: each side must be 1 to 4096");
        }
        Ok(Arc::new(AdaptiveAvgPool { input, output: self.output }))
    }
}

/// The input positions output cell `i` of an axis averages.
fn cell(i: usize, input: usize, output: usize) -> Range<usize> {
    (i * input / output)..((i + 1) * input).div_ceil(output)
}

impl AdaptiveAvgPool {
    /// Each output pixel's window: (output pixel, rows, columns).
    fn windows(&self) -> impl Iterator<Item = (usize, Range<usize>, Range<usize>)> + '_ {
        let ([h, w, _], [oh, ow]) = (self.input, self.output);
        (0..oh).flat_map(move |oy| (0..ow).map(move |ox| (oy * ow + ox, cell(oy, h, oh), cell(ox, w, ow))))
    }

    fn in_len(&self) -> usize {
        self.input.iter().product()
    }

    fn out_len(&self) -> usize {
        self.output[0] * self.output[1] * self.input[2]
    }
}

impl Layer for AdaptiveAvgPool {
    fn kind(&self) -> &'static str {
        "avgpool"
    }

    fn output_shape(&self) -> [usize; 3] {
        [self.output[0], self.output[1], self.input[2]]
    }

    /// An input already of the output's size passes through (torchvision's AlexNet at 224x224).
    fn is_identity(&self, _: Mode) -> bool {
        self.input[..2] == self.output
    }

    fn forward(&self, f: Forward) {
        let (c, w) = (self.input[2], self.input[1]);
        let (in_len, out_len) = (self.in_len(), self.out_len());
        f.y[..f.n * out_len].par_chunks_mut(out_len).zip(f.x.par_chunks(in_len)).for_each(|(y, x)| {
            for (o, rows, cols) in self.windows() {
                let y = &mut y[o * c..(o + 1) * c];
                y.fill(0.0);
                for iy in rows.clone() {
                    for ix in cols.clone() {
                        let p = (iy * w + ix) * c;
                        y.iter_mut().zip(&x[p..p + c]).for_each(|(y, x)| *y += x);
                    }
                }
                let scale = 1.0 / (rows.len() * cols.len()) as f32;
                y.iter_mut().for_each(|y| *y *= scale);
            }
        });
    }

    fn backward(&self, b: Backward) {
        let Some(dx) = b.dx else { return };
        let (c, w) = (self.input[2], self.input[1]);
        let (in_len, out_len) = (self.in_len(), self.out_len());
        dx[..b.n * in_len].par_chunks_mut(in_len).zip(b.dy.par_chunks(out_len)).for_each(|(dx, dy)| {
            dx.fill(0.0);
            for (o, rows, cols) in self.windows() {
                let scale = 1.0 / (rows.len() * cols.len()) as f32;
                let dy = &dy[o * c..(o + 1) * c];
                for iy in rows.clone() {
                    for ix in cols.clone() {
                        let p = (iy * w + ix) * c;
                        dx[p..p + c].iter_mut().zip(dy).for_each(|(dx, dy)| *dx += dy * scale);
                    }
                }
            }
        });
    }

    /// ONNX has no adaptive pooling: the averaging is a constant matrix, [H*W] -> [OH*OW],
    /// applied to each channel's pixels (Reshape, MatMul, Reshape).
    fn onnx(&self, graph: &mut OnnxGraph, name: &str, input: String, _: &[&str]) -> String {
        if self.is_identity(Mode::Eval) {
            return input;
        }
        let ([h, w, c], [oh, ow]) = (self.input, self.output);
        let mut matrix = vec![0.0f32; h * w * oh * ow];
        for (o, rows, cols) in self.windows() {
            let scale = 1.0 / (rows.len() * cols.len()) as f32;
            for iy in rows {
                for ix in cols.clone() {
                    matrix[(iy * w + ix) * oh * ow + o] = scale;
                }
            }
        }
        let matrix = graph.constant(&format!("{name}.matrix"), &[h * w, oh * ow], &matrix);
        let (c, in_pixels, out) = (c as i64, (h * w) as i64, [oh as i64, ow as i64]);
        let flat_shape = graph.constant_i64(&format!("{name}.in_shape"), &[0, c, in_pixels]);
        let out_shape = graph.constant_i64(&format!("{name}.out_shape"), &[0, c, out[0], out[1]]);
        let flat = graph.node("Reshape", &format!("{name}.flatten"), vec![input, flat_shape], vec![]);
        let pooled = graph.node("MatMul", &format!("{name}.matmul"), vec![flat, matrix], vec![]);
        graph.node("Reshape", name, vec![pooled, out_shape], vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::layer::{Param, Saved};
    use crate::layers::testing::{check_grad, random_vec};

    fn pool(input: [usize; 3], output: [usize; 2]) -> AdaptiveAvgPool {
        AdaptiveAvgPool { input, output }
    }

    fn run_forward(p: &AdaptiveAvgPool, n: usize, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; n * p.out_len()];
        let params: [Param; 0] = [];
        let mode = Mode::Eval;
        p.forward(Forward { n, x, y: &mut y, params: &params, saved: &mut Saved::None, algos: None, mode, index: 0 });
        y
    }

    /// The independent reference: PyTorch's definition, one output element at a time.
    fn naive(p: &AdaptiveAvgPool, x: &[f32], n: usize, oy: usize, ox: usize, ch: usize) -> f64 {
        let ([h, w, c], [oh, ow]) = (p.input, p.output);
        let bounds = |i: usize, input: usize, output: usize| {
            let (start, end) = ((i * input) as f64 / output as f64, ((i + 1) * input) as f64 / output as f64);
            (start.floor() as usize, end.ceil() as usize)
        };
        let ((y0, y1), (x0, x1)) = (bounds(oy, h, oh), bounds(ox, w, ow));
        let mut s = 0.0f64;
        for iy in y0..y1 {
            for ix in x0..x1 {
                s += x[n * h * w * c + (iy * w + ix) * c + ch] as f64;
            }
        }
        s / ((y1 - y0) * (x1 - x0)) as f64
    }

    #[test]
    fn windows_are_pytorchs_by_hand() {
        // 5 -> 3: [0, 2), [1, 4), [3, 5) (overlapping); 1 -> 6: the one pixel six times; 7 -> 6.
        assert_eq!((0..3).map(|i| cell(i, 5, 3)).collect::<Vec<_>>(), vec![0..2, 1..4, 3..5]);
        assert!((0..6).all(|i| cell(i, 1, 6) == (0..1)));
        assert_eq!((0..6).map(|i| cell(i, 7, 6)).collect::<Vec<_>>(), vec![0..2, 1..3, 2..4, 3..5, 4..6, 5..7]);
        // A 1-channel 2x2 input pooled to 1x1 is its mean; to 3x3 the corners repeat.
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(run_forward(&pool([2, 2, 1], [1, 1]), 1, &x), vec![2.5]);
        assert_eq!(run_forward(&pool([2, 2, 1], [3, 3]), 1, &x), vec![1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0]);
    }

    /// alexnet-owt's pool5 output at the input sizes of interest: 63 (the smallest), 100, 224
    /// (identity), 256 and 320; plus shapes that do not divide.
    #[test]
    fn forward_and_backward_match_the_reference_on_every_shape() {
        for (side, c) in [(1, 256), (2, 256), (6, 256), (7, 256), (9, 256), (5, 3), (13, 5)] {
            for output in [[6, 6], [3, 2]] {
                let p = pool([side, side, c], output);
                let n = 2;
                let x = random_vec(n * p.in_len(), side as u64);
                let y = run_forward(&p, n, &x);
                for i in (0..y.len()).step_by(7) {
                    let (sample, rest) = (i / p.out_len(), i % p.out_len());
                    let (o, ch) = (rest / c, rest % c);
                    let want = naive(&p, &x, sample, o / output[1], o % output[1], ch);
                    assert!((y[i] as f64 - want).abs() < 1e-5, "{side}x{side}x{c} -> {output:?} [{i}]: {} vs {want}", y[i]);
                }
                // Backward against central differences of a random projection of the output.
                let r = random_vec(y.len(), 99);
                let mut dy = r.clone();
                let mut dx = vec![0.0; x.len()];
                let params: &mut [Param] = &mut [];
                p.backward(Backward {
                    n,
                    x: &x,
                    y: &y,
                    dy: &mut dy,
                    dx: Some(&mut dx),
                    params,
                    saved: &mut Saved::None,
                    algos: None,
                });
                let loss = |x: &[f32]| run_forward(&p, n, x).iter().zip(&r).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
                check_grad("adaptive avg pool dx", &x, &dx, loss);
            }
        }
    }
}
