//! Fully connected layer `y = relu?(x W^T + b)` with PyTorch's weight layout `[out, in]`.
//!
//! The batch is too small to split across threads, so each GEMM is split over the weights:
//! the forward by blocks of W's rows (the rows of `y^T`, or at large batches the columns of `y`),
//! the backward's two gradients by the same blocks of the input's columns
//! (`matmul_par_cols_all`). Each thread streams its own share of the weights once.

use super::bias_relu::{bias_relu, relu_mask_bias_grad};
use super::gemm::{Operand, Product, matmul_par_cols, matmul_par_cols_all, matmul_par_rows};
use super::layer::{Backward, Forward, Layer, ParamLayout, ParamSpec, Spec};
use super::scratch::{give_back, take};
use crate::onnx_graph::{OnnxGraph, int};
use anyhow::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Fully connected; flattens its input (H, W, C in our layout, C, H, W in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearSpec {
    /// Prefix of its parameters' names ("fc6" -> "fc6.weight", "fc6.bias").
    pub name: String,
    pub out: usize,
    pub relu: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub in_len: usize,
    pub out_len: usize,
    pub relu: bool,
}

#[derive(Debug)]
pub struct FullyConnected {
    pub name: String,
    pub linear: Linear,
    /// The input's height, width, channels (flattened in that order).
    pub from: [usize; 3],
}

impl Spec for LinearSpec {
    fn resolve(&self, from: [usize; 3]) -> Result<Arc<dyn Layer>> {
        let linear = Linear { in_len: from.iter().product(), out_len: self.out, relu: self.relu };
        Ok(Arc::new(FullyConnected { name: self.name.clone(), linear, from }))
    }
}

impl Layer for FullyConnected {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn kind(&self) -> &'static str {
        "fc"
    }

    fn output_shape(&self) -> [usize; 3] {
        [1, 1, self.linear.out_len]
    }

    fn params(&self) -> Vec<ParamSpec> {
        let [h, w, c] = self.from;
        let out = self.linear.out_len;
        // PyTorch flattens C, H, W; a 1x1 input is the same either way.
        let layout = if h * w > 1 { ParamLayout::FlattenHwc { out, h, w, c } } else { ParamLayout::Same };
        ParamSpec::weight_and_bias(&self.name, vec![out, h * w * c], layout)
    }

    fn forward(&self, f: Forward) {
        let [w, b] = f.params else { unreachable!("weight and bias") };
        linear_forward(&self.linear, f.n, f.x, &w.value, &b.value, f.y);
    }

    fn backward(&self, b: Backward) {
        let [w, bias] = b.params else { unreachable!("weight and bias") };
        let dw = if w.trainable() { Some(&mut w.grad[..]) } else { None };
        linear_backward(&self.linear, b.n, b.x, &w.value, b.y, b.dy, b.dx, dw, &mut bias.grad);
    }

    /// NCHW flattening is C, H, W order: the order of the checkpoint's columns.
    fn onnx(&self, graph: &mut OnnxGraph, name: &str, input: String, params: &[&str]) -> String {
        let flat = graph.flattened(name, input);
        let out = graph.node("Gemm", name, vec![flat, params[0].to_string(), params[1].to_string()], vec![int("transB", 1)]);
        if self.linear.relu { graph.node("Relu", &format!("{name}.relu"), vec![out], vec![]) } else { out }
    }

    fn gemm(&self, batch: usize) -> Option<[usize; 4]> {
        Some([1, batch, self.linear.out_len, self.linear.in_len])
    }
}

/// `y = relu?(x W^T + b)`. The GEMM repacks whichever operand it reads transposed on every
/// call, so for a batch much smaller than the layer's outputs the forward runs as `y^T = W x^T`
/// with `x^T` transposed here first, once for both threads (W read row by row as stored, each
/// thread taking a block of its rows; `y^T` is transposed into `y` after). Measured on one Zen 4
/// core for fc6 at batch 16, 17 ms against 123 ms for `x W^T`, and the seed model's fc1 at batch
/// 64 3.5 ms against 8.7 on two. Transposing `x` here rather than letting each thread's GEMM
/// pack it took the forward inside the training step to 0.93x (fc1) and 0.94x (fc2), 8
/// alternating pairs of `bench --layers` on two Zen 4 threads.
/// At batch 1000 (fc1, 1024 outputs) the plain form was faster (47 ms against 58).
pub fn linear_forward(l: &Linear, batch: usize, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
    let y = &mut output[..batch * l.out_len];
    if 4 * batch > l.out_len {
        matmul_par_cols(batch, l.out_len, l.in_len, Operand::new(input, l.in_len), Operand::t(weight, l.in_len), y, l.out_len, false);
        return bias_relu(y, bias, l.relu);
    }
    let (mut xt, mut yt) = (take(l.in_len * batch), take(l.out_len * batch));
    transpose(&input[..batch * l.in_len], batch, l.in_len, &mut xt);
    matmul_par_rows(l.out_len, batch, l.in_len, Operand::new(weight, l.in_len), Operand::new(&xt, batch), &mut yt, batch, false);
    // y^T -> y, each row of y gathered from a column of y^T (lines 4 x batch bytes apart: few
    // enough to stay in L1) and finished with the bias and ReLU while it is there: in-step fc1
    // 0.069-0.102 ms, fc2 0.055-0.071, against 0.088-0.134 and 0.069-0.096 as two passes (6
    // alternating pairs, two Zen 4 threads).
    y.par_chunks_mut(l.out_len).enumerate().for_each(|(n, row)| {
        row.iter_mut().zip(yt[n..].iter().step_by(batch)).for_each(|(d, s)| *d = *s);
        bias_relu(row, bias, l.relu);
    });
    give_back(yt);
    give_back(xt);
}

/// `dst [cols x rows] = src [rows x cols]` transposed, for a wide `src` (the input `x`), split
/// over blocks of `BLOCK` rows of `dst` across the pool: a row's run of `BLOCK` floats (one
/// line) at a time into `BLOCK` rows of `dst`. Read a column at a time, a batch of 64 rows of
/// 4,096 floats touches 64 lines 16 KB apart, which share one set of the 8-way L1 and evict
/// each other before the next column reuses them. On two Zen 4 threads, warm: fc1's `x` 0.05-0.08
/// ms (a column at a time: 0.38), AlexNet's fc6 `x` at batch 16 0.04 (0.12-0.15); inside the
/// training step, timed around the call, fc1's 0.28-0.36 ms (was 0.56-0.65) and fc2's
/// 0.045-0.067 (0.12-0.13).
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const BLOCK: usize = 16;
    dst[..rows * cols].par_chunks_mut(rows * BLOCK).enumerate().for_each(|(b, block)| {
        let columns = b * BLOCK..b * BLOCK + block.len() / rows;
        for (r, src_row) in src.chunks(cols).take(rows).enumerate() {
            src_row[columns.clone()].iter().enumerate().for_each(|(c, v)| block[c * rows + r] = *v);
        }
    });
}

/// `d_output` is masked in place by the ReLU; gradients are overwritten.
pub fn linear_backward(
    l: &Linear,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    output: &[f32],
    d_output: &mut [f32],
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
    d_bias: &mut [f32],
) {
    let dy = &mut d_output[..batch * l.out_len];
    d_bias.fill(0.0);
    relu_mask_bias_grad(&output[..batch * l.out_len], dy, d_bias, l.relu);
    let dy = &*dy;
    let (out, inn) = (l.out_len, l.in_len);
    // Both gradients have the input's columns: each thread takes a block of them and computes
    // its part of dX [batch x in] = dY [batch x out] . W [out x in], then of dW [out x in] =
    // dY^T [out x batch] . X [batch x in], in one parallel region. Against two regions with dW
    // first, inside the training step on two Zen 4 threads: fc1's backward 0.94-0.97x, fc2's
    // 0.88-0.96x (two sets of 8 alternating pairs); dX first alone was most of it (fc2 0.89x),
    // plausibly because writing dW's 4-16 MB first pushed out the W that the forward had read.
    let dx = d_input.map(|c| Product { m: batch, k: out, a: Operand::new(dy, out), b: Operand::new(weight, inn), c, ldc: inn, accumulate: false });
    let dw = d_weight.map(|c| Product { m: out, k: batch, a: Operand::t(dy, out), b: Operand::new(input, inn), c, ldc: inn, accumulate: false });
    matmul_par_cols_all(inn, dx.into_iter().chain(dw).collect());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{check_grad, random_vec};

    #[test]
    fn transpose_matches_the_definition() {
        // Wide shapes with a last block narrower than 16 columns, tall ones, the models'
        // batches of 16 and 64.
        for (rows, cols) in [(3, 37), (37, 3), (16, 16), (16, 150), (64, 1030), (1030, 64)] {
            let src = random_vec(rows * cols, 35);
            let mut dst = vec![f32::NAN; rows * cols + 5];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * cols + c], "{rows} x {cols} at ({r}, {c})");
                }
            }
            assert!(dst[rows * cols..].iter().all(|v| v.is_nan()), "{rows} x {cols}: wrote past the end");
        }
    }

    #[test]
    fn forward_and_backward_match_references() {
        // Batch 3 takes the `y^T = W x^T` form (4 x 3 <= 45 outputs), batch 12 the plain one.
        for (batch, relu) in [(3, false), (3, true), (12, false), (12, true)] {
            let l = Linear { in_len: 37, out_len: 45, relu };
            let (x, w, b, r) = (random_vec(batch * 37, 31), random_vec(45 * 37, 32), random_vec(45, 33), random_vec(batch * 45, 34));
            let naive_outputs = |x: &[f32], w: &[f32], b: &[f32]| -> Vec<f64> {
                let mut y = vec![0.0f64; batch * 45];
                for n in 0..batch {
                    for o in 0..45 {
                        let v = b[o] as f64 + (0..37).map(|i| x[n * 37 + i] as f64 * w[o * 37 + i] as f64).sum::<f64>();
                        y[n * 45 + o] = if relu { v.max(0.0) } else { v };
                    }
                }
                y
            };
            let naive = |x: &[f32], w: &[f32], b: &[f32]| -> f64 { naive_outputs(x, w, b).iter().zip(&r).map(|(y, r)| y * *r as f64).sum() };
            let mut y = vec![0.0; batch * 45];
            linear_forward(&l, batch, &x, &w, &b, &mut y);
            for (got, want) in y.iter().zip(naive_outputs(&x, &w, &b)) {
                assert!((*got as f64 - want).abs() < 1e-4, "batch {batch}: {got} against {want}");
            }
            let mut dy = r.clone();
            let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; 45]);
            linear_backward(&l, batch, &x, &w, &y, &mut dy, Some(&mut dx), Some(&mut dw), &mut db);
            check_grad("linear dx", &x, &dx, |v| naive(v, &w, &b));
            check_grad("linear dw", &w, &dw, |v| naive(&x, v, &b));
            check_grad("linear db", &b, &db, |v| naive(&x, &w, v));
        }
    }
}
