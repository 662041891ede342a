//! 2-D convolution over a batch, as im2col + GEMM or direct loops (`direct_conv`), with stride,
//! padding, groups, bias and fused ReLU.
//!
//! Weights are stored HWIO: `[kernel][kernel][in_c / groups][out_c]`, so the weights of group
//! `g` are the column block `g * out_c/groups ..` of a `(k*k*in_c/groups) x out_c` matrix and the
//! im2col matrix of a batch chunk times that block is directly the NHWC output. Checkpoints
//! convert to PyTorch's OIHW (see `checkpoint`). 3x3 and 5x5 stride-1 convolutions, and strided
//! ones that become such on blocks of pixels (`space_to_depth`), can go through `winograd`
//! instead, which does the same arithmetic in 2.6-5.8x fewer multiplications.

use super::bias_relu::{bias_relu, relu_mask_bias_grad};
use super::gemm::{Operand, matmul};
use super::scratch::{ALIGN_SLACK, SCRATCH_A, aligned_copy, give_back, take, take_zeroed, with_scratch};
use super::simd::copy_run;
use super::{Window, sample_ranges, split_by_ranges, sum_partials};
use rayon::prelude::*;
use std::ops::Range;

#[derive(Clone, Copy, Debug)]
pub struct Conv {
    pub win: Window,
    pub in_c: usize,
    pub out_c: usize,
    pub groups: usize,
    pub relu: bool,
}

/// im2col chunks of about 1 MB, counted in output pixels (rows of patches) rather than whole
/// samples: small enough to stay in L2 while the GEMM packs them back (one sample of AlexNet's
/// conv1 is 4.4 MB of patches).
const COL_CHUNK_FLOATS: usize = 1 << 18;
/// But a chunk has at least this many rows: they are its GEMM's rows, and each call packs the
/// weights again (2.7-3.5 MB for AlexNet's conv3-conv5).
const MIN_CHUNK_ROWS: usize = 256;

impl Conv {
    pub fn in_len(&self) -> usize {
        self.win.in_pixels() * self.in_c
    }
    pub fn out_len(&self) -> usize {
        self.win.out_pixels() * self.out_c
    }
    /// Rows of the per-group weight matrix: k * k * in_c / groups.
    pub fn patch_len(&self) -> usize {
        self.win.kernel * self.win.kernel * self.in_c / self.groups
    }
    pub fn weight_len(&self) -> usize {
        self.patch_len() * self.out_c
    }
    fn chunk_rows(&self) -> usize {
        (COL_CHUNK_FLOATS / self.patch_len().max(1)).max(MIN_CHUNK_ROWS)
    }

    /// Sample, output row and output column of im2col row `r` (rows number the output pixels
    /// across the batch, sample by sample).
    fn row_position(&self, r: usize) -> (usize, usize, usize) {
        let (opix, ow) = (self.win.out_pixels(), self.win.w.output);
        (r / opix, r % opix / ow, r % ow)
    }

    /// Gather the patches of im2col rows `rows` (of `input`) for group `g` into `col`.
    fn im2col(&self, input: &[f32], rows: Range<usize>, g: usize, col: &mut [f32]) {
        let (win, k) = (&self.win, self.win.kernel);
        let cin_g = self.in_c / self.groups;
        for (dst, r) in col.chunks_exact_mut(self.patch_len()).zip(rows) {
            let (n, oy, ox) = self.row_position(r);
            let x = &input[n * self.in_len()..(n + 1) * self.in_len()];
            // Where a window row lies inside the input and the group is all of the channels,
            // its k pixels are one contiguous run of k * in_c floats (NHWC): one copy instead
            // of k (AlexNet's conv1: 33 floats, not 11 runs of 3).
            let ix0 = (ox * win.stride).checked_sub(win.w.pad_before).filter(|&ix| ix + k <= win.w.input);
            for ky in 0..k {
                let iy = Window::tap(&win.h, win.stride, oy, ky);
                if let (Some(iy), Some(ix0), 1) = (iy, ix0, self.groups) {
                    let s = (iy * win.w.input + ix0) * self.in_c;
                    copy_run(&mut dst[ky * k * cin_g..(ky + 1) * k * cin_g], &x[s..s + k * cin_g]);
                    continue;
                }
                for kx in 0..k {
                    let d = &mut dst[(ky * k + kx) * cin_g..(ky * k + kx + 1) * cin_g];
                    match (iy, Window::tap(&win.w, win.stride, ox, kx)) {
                        (Some(iy), Some(ix)) => {
                            let s = (iy * win.w.input + ix) * self.in_c + g * cin_g;
                            copy_run(d, &x[s..s + cin_g]);
                        }
                        _ => d.fill(0.0),
                    }
                }
            }
        }
    }

    /// Scatter-add the patch gradients `dcol` of im2col rows `rows`, group `g`, into `d_input`,
    /// which holds the samples from `first` on. Rows in order, taps in order: the additions
    /// into each input value come in output order whatever the chunks.
    fn col2im(&self, dcol: &[f32], rows: Range<usize>, first: usize, g: usize, d_input: &mut [f32]) {
        let (win, k, cin_g) = (&self.win, self.win.kernel, self.in_c / self.groups);
        for (src, r) in dcol.chunks_exact(self.patch_len()).zip(rows) {
            let (n, oy, ox) = self.row_position(r);
            let dx = &mut d_input[(n - first) * self.in_len()..(n - first + 1) * self.in_len()];
            for ky in 0..k {
                let Some(iy) = Window::tap(&win.h, win.stride, oy, ky) else { continue };
                for kx in 0..k {
                    let Some(ix) = Window::tap(&win.w, win.stride, ox, kx) else { continue };
                    let s = (iy * win.w.input + ix) * self.in_c + g * cin_g;
                    let d = &src[(ky * k + kx) * cin_g..(ky * k + kx + 1) * cin_g];
                    for (a, b) in dx[s..s + cin_g].iter_mut().zip(d) {
                        *a += b;
                    }
                }
            }
        }
    }
}

/// Run `f(rows)` over the im2col rows of `samples` in chunks of `chunk_rows` (the last
/// shorter; a chunk may end inside a sample).
fn for_each_chunk(conv: &Conv, samples: Range<usize>, mut f: impl FnMut(Range<usize>)) {
    let (opix, chunk) = (conv.win.out_pixels(), conv.chunk_rows());
    let (first, end) = (samples.start * opix, samples.end * opix);
    (first..end).step_by(chunk).for_each(|r| f(r..(r + chunk).min(end)));
}

/// Grouped convolutions are the paper's towers: one task per group over the whole batch, so
/// with two groups on two threads each tower runs on its own thread, as on the paper's two
/// GPUs. Each tower computes into its own [pixels, out_c / groups] buffer; `interleave` puts
/// the towers' channel blocks back side by side (NHWC).
fn towers_forward(conv: &Conv, batch: usize, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
    let (cout_g, pl, opix) = (conv.out_c / conv.groups, conv.patch_len(), conv.win.out_pixels());
    let mut towers: Vec<Vec<f32>> = (0..conv.groups).map(|_| take(batch * opix * cout_g)).collect();
    towers.par_iter_mut().enumerate().for_each(|(g, out_g)| {
        with_scratch(&SCRATCH_A, conv.chunk_rows() * pl, |col| {
            for_each_chunk(conv, 0..batch, |rows| {
                conv.im2col(input, rows.clone(), g, col);
                let w = Operand::new(&weight[g * cout_g..], conv.out_c);
                matmul(rows.len(), cout_g, pl, Operand::new(col, pl), w, &mut out_g[rows.start * cout_g..], cout_g, false);
            });
        });
    });
    interleave(&towers, &mut output[..batch * conv.out_len()], conv.out_c);
    output[..batch * conv.out_len()].par_chunks_mut(conv.out_len()).for_each(|y| bias_relu(y, bias, conv.relu));
    towers.into_iter().for_each(give_back);
}

/// `dst` rows of `width` = the towers' rows side by side.
fn interleave(towers: &[Vec<f32>], dst: &mut [f32], width: usize) {
    let part = width / towers.len();
    dst.par_chunks_mut(width * 256).enumerate().for_each(|(i, rows)| {
        for (r, row) in rows.chunks_exact_mut(width).enumerate() {
            let at = (i * 256 + r) * part;
            for (block, t) in row.chunks_exact_mut(part).zip(towers) {
                block.copy_from_slice(&t[at..at + part]);
            }
        }
    });
}

/// Backward of `towers_forward` from the masked `d_output`: each tower's weight and input
/// gradients in its own buffers (the input gradient of tower g only touches its input
/// channels), merged after. Computes whichever of `d_input`, `d_weight` is given.
fn towers_backward(
    conv: &Conv,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    dy: &[f32],
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
) {
    let (cout_g, pl) = (conv.out_c / conv.groups, conv.patch_len());
    let (need_dx, need_dw) = (d_input.is_some(), d_weight.is_some());
    let grads: Vec<(Vec<f32>, Vec<f32>)> = (0..conv.groups)
        .into_par_iter()
        .map(|g| {
            let mut dw = if need_dw { take_zeroed(pl * cout_g) } else { Vec::new() };
            let mut dx = if need_dx { take_zeroed(batch * conv.in_len()) } else { Vec::new() };
            with_scratch(&SCRATCH_A, conv.chunk_rows() * pl, |col| {
                for_each_chunk(conv, 0..batch, |rows| {
                    let dy_g = Operand::new(&dy[rows.start * conv.out_c + g * cout_g..], conv.out_c);
                    if need_dw {
                        conv.im2col(input, rows.clone(), g, col);
                        matmul(pl, cout_g, rows.len(), Operand::t(col, pl), dy_g, &mut dw, cout_g, true);
                    }
                    if need_dx {
                        // The patch gradients reuse the im2col buffer: its patches are spent.
                        let w_t = Operand::t(&weight[g * cout_g..], conv.out_c);
                        matmul(rows.len(), pl, cout_g, dy_g, w_t, col, pl, false);
                        conv.col2im(col, rows, 0, g, &mut dx);
                    }
                });
            });
            (dw, dx)
        })
        .collect();
    let (dws, dxs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = grads.into_iter().unzip();
    if let Some(d_weight) = d_weight {
        interleave(&dws, d_weight, conv.out_c);
    }
    if let Some(d_input) = d_input {
        let d_input = &mut d_input[..batch * conv.in_len()];
        d_input.fill(0.0);
        for dx in &dxs {
            d_input.par_chunks_mut(1 << 14).zip(dx.par_chunks(1 << 14)).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        }
    }
    dws.into_iter().chain(dxs).for_each(give_back);
}

/// Forward over a batch by direct loops (`direct_conv`): `output = relu?(conv(input, weight) + bias)`.
pub fn direct_forward(conv: &Conv, batch: usize, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
    let mut weight_copy = take(weight.len() + ALIGN_SLACK);
    let weight = &*aligned_copy(&mut weight_copy, weight);
    output[..batch * conv.out_len()].par_chunks_mut(conv.out_len()).zip(input.par_chunks(conv.in_len())).for_each(|(y, x)| {
        conv.direct_forward_sample(x, weight, bias, y);
    });
    give_back(weight_copy);
}

/// Forward over a batch as im2col + GEMM (grouped convolutions as towers).
pub fn im2col_forward(conv: &Conv, batch: usize, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32]) {
    if conv.groups > 1 {
        return towers_forward(conv, batch, input, weight, bias, output);
    }
    let (pl, opix) = (conv.patch_len(), conv.win.out_pixels());
    let ranges = sample_ranges(batch);
    let mut outs = split_by_ranges(&mut output[..batch * conv.out_len()], &ranges, conv.out_len());
    ranges.par_iter().zip(outs.par_iter_mut()).for_each(|(range, out)| {
        let first = range.start * opix;
        with_scratch(&SCRATCH_A, conv.chunk_rows() * pl, |col| {
            for_each_chunk(conv, range.clone(), |rows| {
                let y = &mut out[(rows.start - first) * conv.out_c..(rows.end - first) * conv.out_c];
                conv.im2col(input, rows.clone(), 0, col);
                matmul(rows.len(), conv.out_c, pl, Operand::new(col, pl), Operand::new(weight, conv.out_c), y, conv.out_c, false);
                bias_relu(y, bias, conv.relu);
            });
        });
    });
}

/// The first step of every convolution's backward: mask `d_output` in place by the fused ReLU
/// and overwrite `d_bias` with its sum over the batch (per-thread partials summed in a fixed
/// order, so the result is reproducible for a thread count).
pub fn relu_bias_backward(conv: &Conv, batch: usize, output: &[f32], d_output: &mut [f32], d_bias: &mut [f32]) {
    let ranges = sample_ranges(batch);
    let mut dys = split_by_ranges(&mut d_output[..batch * conv.out_len()], &ranges, conv.out_len());
    let mut partials: Vec<Vec<f32>> = ranges.iter().map(|_| take_zeroed(conv.out_c)).collect();
    ranges.par_iter().zip(dys.par_iter_mut()).zip(partials.par_iter_mut()).for_each(|((range, dy), db)| {
        relu_mask_bias_grad(&output[range.start * conv.out_len()..range.end * conv.out_len()], dy, db, conv.relu);
    });
    sum_partials(partials, d_bias);
}

/// Input and/or weight gradient (whichever is given; both overwritten) by direct loops, from
/// the masked `d_output`.
pub fn direct_backward(
    conv: &Conv,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    d_output: &[f32],
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
) {
    let corners = conv.corners();
    per_range_backward(conv, batch, d_input, d_weight, None, |range, dy, mut dx, mut dw, _| {
        for (j, nn) in range.enumerate() {
            let dxs = dx.as_deref_mut().map(|d| &mut d[j * conv.in_len()..(j + 1) * conv.in_len()]);
            let x = &input[nn * conv.in_len()..(nn + 1) * conv.in_len()];
            conv.direct_backward_sample(x, weight, &d_output[dy + j * conv.out_len()..], &corners, dw.as_deref_mut(), dxs);
        }
    });
}

/// The weight and bias gradients (overwritten) of a layer with no input gradient to make (a
/// first layer), by direct loops, from `d_output` before the ReLU's mask: each chunk of a
/// sample's pixels is masked and summed into the bias gradient just before the weight gradient
/// reads it, instead of in a pass of its own over the batch (`relu_bias_backward`, which reads
/// the output and its gradient from memory and writes the gradient back: 56 MB a batch of 16
/// for the paper's conv1). The same sums in the same order: the same bits as that pass and
/// `direct_backward`.
pub fn direct_weight_and_bias_grad(
    conv: &Conv,
    batch: usize,
    input: &[f32],
    output: &[f32],
    d_output: &[f32],
    d_weight: &mut [f32],
    d_bias: &mut [f32],
) {
    let (corners, (il, ol)) = (conv.corners(), (conv.in_len(), conv.out_len()));
    per_range_backward(conv, batch, None, Some(d_weight), Some(d_bias), |range, dy, _, dw, db| {
        let (dw, db) = (dw.expect("the weight gradient"), db.expect("the bias gradient"));
        for (j, n) in range.enumerate() {
            let at = dy + j * ol..dy + (j + 1) * ol;
            conv.direct_masked_weight_grad_sample(&input[n * il..(n + 1) * il], &output[at.clone()], &d_output[at], &corners, dw, db);
        }
    });
}

/// Input and/or weight gradient (whichever is given; both overwritten) as GEMMs: dW = col^T dY
/// over im2col patches, and dcol = dY W^T scattered back onto the input pixels (col2im).
pub fn im2col_backward(
    conv: &Conv,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    d_output: &[f32],
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
) {
    if conv.groups > 1 {
        return towers_backward(conv, batch, input, weight, &d_output[..batch * conv.out_len()], d_input, d_weight);
    }
    let (pl, oc) = (conv.patch_len(), conv.out_c);
    per_range_backward(conv, batch, d_input, d_weight, None, |range, _, mut dx, mut dw, _| {
        with_scratch(&SCRATCH_A, conv.chunk_rows() * pl, |col| {
            for_each_chunk(conv, range.clone(), |rows| {
                // Row r's output gradient is at r * oc of the batch's.
                let dy = Operand::new(&d_output[rows.start * oc..], oc);
                if let Some(dw) = dw.as_deref_mut() {
                    conv.im2col(input, rows.clone(), 0, col);
                    matmul(pl, oc, rows.len(), Operand::t(col, pl), dy, dw, oc, true);
                }
                if let Some(dx) = dx.as_deref_mut() {
                    // The patch gradients reuse the im2col buffer: its patches are spent.
                    matmul(rows.len(), pl, oc, dy, Operand::t(weight, oc), col, pl, false);
                    conv.col2im(col, rows, range.start, 0, dx);
                }
            });
        });
    });
}

/// The shared frame of the per-sample-range backward passes: splits `d_input` by range (zeroed),
/// gives each range zeroed weight- and bias-gradient partials when `d_weight`, `d_bias` are
/// wanted, runs `f(range, offset of the range in d_output, dx, dw, db)` in parallel, and sums
/// the partials in a fixed order.
pub(super) fn per_range_backward(
    conv: &Conv,
    batch: usize,
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
    d_bias: Option<&mut [f32]>,
    f: impl Fn(std::ops::Range<usize>, usize, Option<&mut [f32]>, Option<&mut [f32]>, Option<&mut [f32]>) + Sync,
) {
    let ranges = sample_ranges(batch);
    let mut d_ins: Vec<Option<&mut [f32]>> = match d_input {
        Some(dx) => split_by_ranges(&mut dx[..batch * conv.in_len()], &ranges, conv.in_len()).into_iter().map(Some).collect(),
        None => ranges.iter().map(|_| None).collect(),
    };
    let partials =
        |wanted: bool, len: usize| -> Vec<Vec<f32>> { ranges.iter().map(|_| if wanted { take_zeroed(len) } else { Vec::new() }).collect() };
    let (want_dw, want_db) = (d_weight.is_some(), d_bias.is_some());
    let (mut dws, mut dbs) = (partials(want_dw, conv.weight_len()), partials(want_db, conv.out_c));
    ranges.par_iter().zip(d_ins.par_iter_mut()).zip(dws.par_iter_mut()).zip(dbs.par_iter_mut()).for_each(|(((range, dx), dw), db)| {
        if let Some(dx) = dx.as_deref_mut() {
            dx.fill(0.0);
        }
        f(range.clone(), range.start * conv.out_len(), dx.as_deref_mut(), want_dw.then_some(&mut dw[..]), want_db.then_some(&mut db[..]));
    });
    for (sums, out) in [(dws, d_weight), (dbs, d_bias)] {
        match out {
            Some(out) => sum_partials(sums, out),
            None => sums.into_iter().for_each(give_back),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Padding;
    use crate::layers::testing::{check_grad, random_vec};

    /// Direct 7-loop convolution: the independent reference. (`conv_algo`'s tests check every
    /// algorithm, Winograd included, and each pass alone, on every model's layers.)
    fn conv_naive(c: &Conv, batch: usize, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let (cin_g, cout_g, k) = (c.in_c / c.groups, c.out_c / c.groups, c.win.kernel);
        let mut y = vec![0.0; batch * c.out_len()];
        for n in 0..batch {
            for oy in 0..c.win.h.output {
                for ox in 0..c.win.w.output {
                    for co in 0..c.out_c {
                        let g = co / cout_g;
                        let mut s = b[co];
                        for ky in 0..k {
                            for kx in 0..k {
                                let (Some(iy), Some(ix)) =
                                    (Window::tap(&c.win.h, c.win.stride, oy, ky), Window::tap(&c.win.w, c.win.stride, ox, kx))
                                else {
                                    continue;
                                };
                                for ci in 0..cin_g {
                                    s += x[n * c.in_len() + (iy * c.win.w.input + ix) * c.in_c + g * cin_g + ci]
                                        * w[((ky * k + kx) * cin_g + ci) * c.out_c + co];
                                }
                            }
                        }
                        y[n * c.out_len() + (oy * c.win.w.output + ox) * c.out_c + co] = if c.relu { s.max(0.0) } else { s };
                    }
                }
            }
        }
        y
    }

    fn cases() -> Vec<(Conv, usize)> {
        let mk = |h, w, k, s, p, in_c, out_c, groups, relu| Conv { win: Window::new(h, w, k, s, p).unwrap(), in_c, out_c, groups, relu };
        vec![
            (mk(6, 5, 3, 1, Padding::Same, 3, 4, 1, true), 2),
            (mk(28, 28, 3, 1, Padding::Same, 1, 4, 1, true), 3),
            (mk(6, 7, 3, 2, Padding::Same, 2, 4, 2, true), 2),
            // im2col + GEMM (patches of 32 or more):
            (mk(6, 5, 3, 1, Padding::Same, 8, 5, 1, true), 2),
            (mk(9, 9, 3, 2, Padding::Same, 8, 6, 2, false), 2),
            (mk(7, 7, 3, 2, Padding::Same, 2, 3, 1, false), 3),
            (mk(9, 8, 5, 2, Padding::Valid, 4, 6, 2, true), 2),
            (mk(5, 6, 3, 1, Padding::Explicit(1), 4, 4, 2, false), 1),
        ]
    }

    /// Random inputs with a blank band of rows and of columns in every sample, as digits have:
    /// the direct loops skip the windows that hold only zeros.
    fn input_with_blanks(c: &Conv, batch: usize, seed: u64) -> Vec<f32> {
        let (w, ch) = (c.win.w.input, c.in_c);
        let blank = |i: usize| (i % c.in_len()) / (w * ch) < c.win.h.input / 3 || (i / ch) % w >= w - w / 3;
        random_vec(batch * c.in_len(), seed).into_iter().enumerate().map(|(i, v)| if blank(i) { 0.0 } else { v }).collect()
    }

    #[test]
    fn forward_matches_direct_convolution() {
        for (c, batch) in cases() {
            let x = input_with_blanks(&c, batch, 1);
            let w = random_vec(c.weight_len(), 2);
            let b = random_vec(c.out_c, 3);
            let want = conv_naive(&c, batch, &x, &w, &b);
            for run in [direct_forward, im2col_forward] {
                let mut y = vec![0.0; batch * c.out_len()];
                run(&c, batch, &x, &w, &b, &mut y);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{a} vs {b} for {c:?}");
                }
            }
        }
    }

    type ForwardFn = fn(&Conv, usize, &[f32], &[f32], &[f32], &mut [f32]);
    type BackwardFn = fn(&Conv, usize, &[f32], &[f32], &[f32], Option<&mut [f32]>, Option<&mut [f32]>);

    /// On inputs with blank regions, where the direct loops skip empty windows, their gradients
    /// are the GEMMs' (finite differences on such inputs trip over the ReLU's kink: the outputs
    /// of empty windows all sit at the bias).
    #[test]
    fn direct_backward_on_blank_regions_matches_im2col() {
        for (c, batch) in cases() {
            let x = input_with_blanks(&c, batch, 4);
            let w = random_vec(c.weight_len(), 5);
            let dy = random_vec(batch * c.out_len(), 7);
            let grads = |run: BackwardFn| {
                let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
                run(&c, batch, &x, &w, &dy, Some(&mut dx), Some(&mut dw));
                dx.into_iter().chain(dw).collect::<Vec<f32>>()
            };
            for (a, b) in grads(direct_backward).iter().zip(grads(im2col_backward)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b} for {c:?}");
            }
        }
    }

    /// Patches of 1,152 floats make 256-row im2col chunks, which end inside the 17x17 maps'
    /// samples: the GEMMs, the weight gradient accumulated across chunks and the scatter of
    /// patch gradients onto the inputs all agree with the direct loops, in one tower and two.
    #[test]
    fn chunks_ending_inside_samples_match_direct_loops() {
        for groups in [1, 2] {
            let c = Conv { win: Window::new(17, 17, 3, 1, Padding::Same).unwrap(), in_c: 128 * groups, out_c: 8, groups, relu: true };
            assert_eq!((c.chunk_rows(), c.win.out_pixels()), (256, 289));
            let batch = 2;
            let (x, w, b) = (random_vec(batch * c.in_len(), 1), random_vec(c.weight_len(), 2), random_vec(c.out_c, 3));
            let outputs = [direct_forward as ForwardFn, im2col_forward].map(|run| {
                let mut y = vec![0.0; batch * c.out_len()];
                run(&c, batch, &x, &w, &b, &mut y);
                y
            });
            let dy = random_vec(batch * c.out_len(), 4);
            let grads = [direct_backward as BackwardFn, im2col_backward].map(|run| {
                let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
                run(&c, batch, &x, &w, &dy, Some(&mut dx), Some(&mut dw));
                dx.into_iter().chain(dw).collect::<Vec<f32>>()
            });
            for [want, got] in [outputs, grads] {
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}, {groups} groups");
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (c, batch) in cases() {
            let x = random_vec(batch * c.in_len(), 4);
            let w = random_vec(c.weight_len(), 5);
            let b = random_vec(c.out_c, 6);
            let r = random_vec(batch * c.out_len(), 7);
            // Loss = sum(r * conv(x)); its gradient w.r.t. the output is r.
            let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
                conv_naive(&c, batch, x, w, b).iter().zip(&r).map(|(y, r)| (*y as f64) * (*r as f64)).sum()
            };
            let mut y = vec![0.0; batch * c.out_len()];
            im2col_forward(&c, batch, &x, &w, &b, &mut y);
            let mut dy = r.clone();
            let mut db = vec![0.0; b.len()];
            relu_bias_backward(&c, batch, &y, &mut dy, &mut db);
            check_grad("conv db", &b, &db, |v| loss(&x, &w, v));
            for run in [direct_backward, im2col_backward] {
                let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()]);
                run(&c, batch, &x, &w, &dy, Some(&mut dx), Some(&mut dw));
                check_grad("conv dx", &x, &dx, |v| loss(v, &w, &b));
                check_grad("conv dw", &w, &dw, |v| loss(&x, v, &b));
            }
        }
    }
}
