//! The direct convolution of one sample: the loops of the definition, blocked so that the sums
//! stay in vector registers. Best where patches are short (the seed model's conv1 has 9 taps
//! of one channel: a GEMM with k = 9 spends its time packing, not multiplying).
//!
//! The kernels read the sample through a copy with its padding written out as zeros, so every
//! output pixel has all k*k taps at fixed offsets from its window's corner and no pixel needs
//! bounds logic. (The zero taps add exact zeros: the sums are those of the taps inside.)
//!
//! A window that holds only zeros has sums of exact zeros (weights being finite: training stops
//! at the first non-finite value), so the forward writes relu(bias)
//! there without multiplying and the weight gradient skips it: MNIST digits leave most of
//! conv1's windows empty.

use super::bias_relu::relu_mask_bias_grad;
use super::conv::Conv;
use super::scratch::{SCRATCH_B, SCRATCH_C, with_scratch};
use super::simd::{L, Lanes, copy_run, for_lane_blocks, load, nonzero_bounds, store};

/// The forward's block of sums held in registers: `FORWARD_PIXELS` output pixels by
/// `FORWARD_CHANNELS` channels, with one block of weights. AVX-512's 32 vector registers hold
/// 6 pixels by 4 vectors (24 sums, 4 weight vectors, one broadcast input; 4 pixels, 16 sums,
/// left the FMA pipes short of work: the paper's conv1 forward 20.5 -> 18.1 ms per batch of
/// 16 on one core of a Xeon); AVX2's 16 do not (LLVM spilled the sums to the stack), so there
/// it is 6 pixels by 2 vectors (12 sums, 2 weights, one broadcast input), the shape of the
/// `gemm` crate's AVX2 kernel.
const FORWARD_PIXELS: usize = 6;
const FORWARD_CHANNELS: usize = if L == 16 { 4 * L } else { 2 * L };

/// The weight gradient's block of sums held in registers: `WEIGHT_GRAD_ROWS` weight rows by
/// 4L channels, over chunks of `WEIGHT_GRAD_PIXELS` output pixels. AVX-512 holds 6 rows by 4
/// vectors (24 sums, 4 gradient vectors, one broadcast input); AVX2 3 by 4 (12 sums).
const WEIGHT_GRAD_ROWS: usize = if L == 16 { 6 } else { 3 };
/// 64 pixels of the paper's conv1 output gradient: 24 KB, half of L1.
const WEIGHT_GRAD_PIXELS: usize = 64;

/// Each output row's live columns (`Conv::find_live`), and the spans that found them.
#[derive(Default)]
pub(super) struct LiveColumns {
    spans: Vec<(usize, usize)>,
    /// `rows[oy]`: the columns of output row oy whose windows may hold a nonzero.
    pub(super) rows: Vec<std::ops::Range<usize>>,
}

impl LiveColumns {
    /// Whether output pixel `o` (of rows `ow` wide) is live: its window may hold a nonzero.
    fn holds(&self, o: usize, ow: usize) -> bool {
        self.rows[o / ow].contains(&(o % ow))
    }
}

impl Conv {
    /// Forward of sample `x`: `y = relu?(conv(x, weight) + bias)`.
    pub(super) fn direct_forward_sample(&self, x: &[f32], weight: &[f32], bias: &[f32], y: &mut [f32]) {
        self.with_live(x, |xp, live| {
            let (ow, row_len) = (self.win.w.output, self.win.w.output * self.out_c);
            self.forward_padded(xp, live, &self.group_offsets(), weight, bias, 0..self.win.h.output, y, |oy| oy * row_len, |_| 0..ow);
        });
    }

    /// Backward of sample `x` from its masked output gradient `dy`: adds into `dw` and into
    /// `dx`, each if given. `pixels` lists (output pixel, offset of its window's corner in the
    /// padded sample), in order, for every pixel whose gradient row may be nonzero: all of
    /// them (`corners`), or after a max-pool only those the pooled gradient reached. Skipping a
    /// zero row skips exact zeros, so the sums are the same.
    pub(super) fn direct_backward_sample(
        &self,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        pixels: &[(usize, usize)],
        dw: Option<&mut [f32]>,
        dx: Option<&mut [f32]>,
    ) {
        if let Some(dw) = dw {
            self.with_live(x, |xp, live| {
                let ow = self.win.w.output;
                let pixels: Vec<(usize, usize)> = pixels.iter().filter(|&&(o, _)| live.holds(o, ow)).copied().collect();
                self.weight_grad_padded(xp, dy, &pixels, &self.group_offsets(), dw);
            });
        }
        if let Some(dx) = dx {
            with_scratch(&SCRATCH_C, self.padded_len(), |dxp| self.input_grad_padded(weight, dy, pixels, dxp, dx));
        }
    }

    /// Weight and bias gradients of sample `x` from its output `y` and its output gradient
    /// `dy` before the ReLU's mask, added into `dw` and `db`: a chunk of pixels at a time, the
    /// chunk's gradient rows are masked into scratch and summed into `db`
    /// (`relu_mask_bias_grad`: the rows in order, as over the whole batch), then the weight
    /// gradient reads them from L1. `corners`: every pixel (`corners()`).
    pub(super) fn direct_masked_weight_grad_sample(
        &self,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        corners: &[(usize, usize)],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let (ow, oc) = (self.win.w.output, self.out_c);
        self.with_live(x, |xp, live| {
            let (mut pixels, offsets) = (Vec::with_capacity(WEIGHT_GRAD_PIXELS), self.group_offsets());
            with_scratch(&SCRATCH_C, WEIGHT_GRAD_PIXELS * oc, |masked| {
                for chunk in corners.chunks(WEIGHT_GRAD_PIXELS) {
                    // The chunk's rows of the output and its gradient.
                    let floats = chunk[0].0 * oc..(chunk[chunk.len() - 1].0 + 1) * oc;
                    let masked = &mut masked[..floats.len()];
                    masked.copy_from_slice(&dy[floats.clone()]);
                    relu_mask_bias_grad(&y[floats], masked, db, self.relu);
                    // The chunk's pixels whose windows may hold a nonzero, their rows counted
                    // from the chunk's first.
                    pixels.clear();
                    pixels.extend(chunk.iter().filter(|&&(o, _)| live.holds(o, ow)).map(|&(o, c)| (o - chunk[0].0, c)));
                    self.weight_grad_padded(xp, masked, &pixels, &offsets, dw);
                }
            });
        });
    }

    /// Every output pixel with the offset of its window's corner in the padded sample.
    pub(super) fn corners(&self) -> Vec<(usize, usize)> {
        let (wp, s, ow) = (self.padded_dims().1, self.win.stride, self.win.w.output);
        (0..self.win.out_pixels()).map(|o| (o, ((o / ow) * s * wp + (o % ow) * s) * self.in_c)).collect()
    }

    /// Overwrite `live` with each output row's live columns: those whose windows in the padded
    /// sample `xp` may hold a nonzero, as far as each row's span of nonzero pixels tells (a
    /// window left or right of the spans of all its rows is empty). (Flags per pixel cost, in a
    /// profile, about as much as the multiplications they saved; the spans cost one pass over
    /// the sample and follow a digit's outline: 31% of conv1's windows on MNIST digits are live.)
    pub(super) fn find_live(&self, xp: &[f32], live: &mut LiveColumns) {
        let ((hp, wp), (k, s), (oh, ow)) = (self.padded_dims(), (self.win.kernel, self.win.stride), (self.win.h.output, self.win.w.output));
        // Each padded row's nonzero pixels lie in columns first..end (end = 0: none).
        live.spans.clear();
        live.spans.extend(xp.chunks_exact(wp * self.in_c).map(|row| match nonzero_bounds(row) {
            Some((first, last)) => (first / self.in_c, last / self.in_c + 1),
            None => (wp, 0),
        }));
        debug_assert_eq!(live.spans.len(), hp);
        live.rows.clear();
        for oy in 0..oh {
            let (first, end) = live.spans[oy * s..oy * s + k].iter().fold((wp, 0), |(f, e), &(f2, e2)| (f.min(f2), e.max(e2)));
            // Window ox covers columns ox*s .. ox*s + k: it meets first..end where
            // ox*s + k > first and ox*s < end.
            let from = if first >= k { (first - k) / s + 1 } else { 0 };
            live.rows.push(from..end.div_ceil(s).min(ow).max(from));
        }
    }

    /// Group `g`'s patch of each output pixel of the padded sample `xp` into `patches`, as
    /// rows of `stride` floats, in order (the im2col matrix of one sample and group): the
    /// `patch_len()` values, then zeros. Rows of pixels that are not `live`, and any past the
    /// last pixel's, are zeros. `offsets` are group g's `row_offsets`.
    pub(super) fn patch_rows(&self, xp: &[f32], live: &LiveColumns, offsets: &[usize], stride: usize, patches: &mut [f32]) {
        let (wp, s, ow) = (self.padded_dims().1, self.win.stride, self.win.w.output);
        patches.fill(0.0);
        for (oy, columns) in live.rows.iter().enumerate() {
            for ox in columns.clone() {
                let corner = (oy * s * wp + ox * s) * self.in_c;
                let row = &mut patches[(oy * ow + ox) * stride..][..offsets.len()];
                row.iter_mut().zip(offsets).for_each(|(v, off)| *v = xp[corner + off]);
            }
        }
    }

    /// Rows and columns of the padded sample: as far as the last window reaches.
    pub(super) fn padded_dims(&self) -> (usize, usize) {
        let span = |out: usize| (out - 1) * self.win.stride + self.win.kernel;
        (span(self.win.h.output), span(self.win.w.output))
    }

    /// Floats in a padded sample (NHWC, like the sample).
    pub(super) fn padded_len(&self) -> usize {
        let (h, w) = self.padded_dims();
        h * w * self.in_c
    }

    /// `f` of sample `x` as a padded sample: `x` itself where the windows neither reach past
    /// its edges nor stop short of them (the paper's conv1: 618 KB a sample not copied),
    /// else a copy with zeros around it, in this thread's scratch.
    pub(super) fn with_padded<R>(&self, x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
        let ((hp, wp), win) = (self.padded_dims(), &self.win);
        if win.h.pad_before == 0 && win.w.pad_before == 0 && (hp, wp) == (win.h.input, win.w.input) {
            return f(x);
        }
        with_scratch(&SCRATCH_B, self.padded_len(), |xp| {
            self.pad_sample(x, xp);
            f(xp)
        })
    }

    /// `f` of sample `x` as a padded sample (`with_padded`) and its live columns (`find_live`).
    fn with_live<R>(&self, x: &[f32], f: impl FnOnce(&[f32], &LiveColumns) -> R) -> R {
        self.with_padded(x, |xp| {
            let mut live = LiveColumns::default();
            self.find_live(xp, &mut live);
            f(xp, &live)
        })
    }

    /// Write sample `x` into `xp` (`padded_len()` floats) with zeros around it.
    fn pad_sample(&self, x: &[f32], xp: &mut [f32]) {
        xp.fill(0.0);
        // Inline vector moves: a call to memcpy per row (28 floats in the seed model's conv1)
        // was 2% of the fused pair's warm forward profile on the Xeon.
        self.for_each_interior_row(|padded, at, len| copy_run(&mut xp[padded..padded + len], &x[at..at + len]));
    }

    /// Add the interior of a padded input gradient `dxp` into the sample's `dx`.
    fn add_unpadded(&self, dxp: &[f32], dx: &mut [f32]) {
        self.for_each_interior_row(|padded, at, len| {
            dx[at..at + len].iter_mut().zip(&dxp[padded..padded + len]).for_each(|(a, b)| *a += b);
        });
    }

    /// `f(offset in the padded sample, offset in the sample, floats)` for each row of the sample
    /// as it lies in the padded one. A window need not reach the last rows or columns (VALID
    /// with a stride that does not divide): those are left out.
    fn for_each_interior_row(&self, mut f: impl FnMut(usize, usize, usize)) {
        let ((hp, wp), c, win) = (self.padded_dims(), self.in_c, &self.win);
        let rows = win.h.input.min(hp - win.h.pad_before);
        let cols = win.w.input.min(wp - win.w.pad_before);
        for iy in 0..rows {
            f(((iy + win.h.pad_before) * wp + win.w.pad_before) * c, iy * win.w.input * c, cols * c);
        }
    }

    /// `row_offsets` of each group.
    pub(super) fn group_offsets(&self) -> Vec<Vec<usize>> {
        (0..self.groups).map(|g| self.row_offsets(g)).collect()
    }

    /// Offsets in the padded sample of group `g`'s weight rows (row r = tap ky*k + kx, channel
    /// ci) from their window's corner.
    pub(super) fn row_offsets(&self, g: usize) -> Vec<usize> {
        let (k, cin_g, wp) = (self.win.kernel, self.in_c / self.groups, self.padded_dims().1);
        (0..self.patch_len()).map(|r| ((r / cin_g / k) * wp + (r / cin_g) % k) * self.in_c + g * cin_g + r % cin_g).collect()
    }

    /// Forward of output rows `rows` of one padded sample: `y = relu?(conv(xp, weight) +
    /// bias)`, output row `oy` at `y[row_at(oy)..]`, in its `columns(oy)` (which hold its live
    /// columns; the others are left as they are). Output channels go in blocks of
    /// `FORWARD_CHANNELS`, L, then 1 and pixels in blocks of `FORWARD_PIXELS`, the sums in
    /// registers, each weight row loaded once for the block's pixels. Where none of a block's
    /// pixels is `live`, no weight row is read; `offsets` are `group_offsets()`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_padded(
        &self,
        xp: &[f32],
        live: &LiveColumns,
        offsets: &[Vec<usize>],
        weight: &[f32],
        bias: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        row_at: impl Fn(usize) -> usize,
        columns: impl Fn(usize) -> std::ops::Range<usize>,
    ) {
        let cout_g = self.out_c / self.groups;
        let unit_step = self.win.stride * self.in_c == 1;
        for (g, offsets) in offsets.iter().enumerate() {
            for_lane_blocks!(g * cout_g..(g + 1) * cout_g, wide = FORWARD_CHANNELS, |c, N| {
                let rows = rows.clone();
                if unit_step {
                    self.forward_channels::<N, 1>(xp, live, offsets, weight, bias, rows, y, (&row_at, &columns), c)
                } else {
                    self.forward_channels::<N, 0>(xp, live, offsets, weight, bias, rows, y, (&row_at, &columns), c)
                }
            });
        }
    }

    /// Output channels `c..c + N` (of one group, whose weight rows are at `offsets`) of every
    /// pixel of `rows`, `FORWARD_PIXELS` at a time where it can. `STEP`: the input floats from
    /// one pixel's window to the next, where it is 1 (one input channel, stride 1), else 0 for
    /// "worked out at run time". (As a constant, each input read's address is a displacement:
    /// six address computations fewer a tap at 8 lanes, the 8-lane forward warm 0.96x.)
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn forward_channels<const N: usize, const STEP: usize>(
        &self,
        xp: &[f32],
        live: &LiveColumns,
        offsets: &[usize],
        weight: &[f32],
        bias: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        (row_at, columns): (&impl Fn(usize) -> usize, &impl Fn(usize) -> std::ops::Range<usize>),
        c: usize,
    ) {
        let (wp, s, ow) = (self.padded_dims().1, self.win.stride, self.win.w.output);
        let reach = offsets.iter().copied().max().unwrap_or(0);
        for oy in rows {
            let (corner, y) = (|ox: usize| (oy * s * wp + ox * s) * self.in_c, &mut y[row_at(oy)..][..ow * self.out_c]);
            // What `forward_pixels` reads without bounds checks: every tap of the row's last
            // window lies inside the padded sample, and so do the others', which start before it.
            assert!(corner(ow - 1) + reach < xp.len(), "output row {oy}'s windows lie inside the padded sample");
            // Pixels left of the live columns, the live ones, and those right of them: blocks
            // of `FORWARD_PIXELS`, then one block of what is left of each. (One pixel at a
            // time, each tap's FMAs waited on the last one's, at 8 lanes two vectors of sums a
            // pixel: the seed model's conv1 forward took 1/0.94 the time in the training step,
            // 8-lane build on a Zen 4.)
            let (live, columns) = (&live.rows[oy], columns(oy));
            let (from, to) = if live.is_empty() { (columns.end, columns.end) } else { (live.start, live.end) };
            debug_assert!(columns.start <= from && to <= columns.end, "row {oy}'s columns {columns:?} hold its live ones {live:?}");
            let mut ox = columns.start;
            for (end, offsets) in [(from, &offsets[..0]), (to, offsets), (columns.end, &offsets[..0])] {
                while ox + FORWARD_PIXELS <= end {
                    self.forward_pixels::<N, FORWARD_PIXELS, STEP>(xp, offsets, weight, bias, y, c, ox, corner(ox));
                    ox += FORWARD_PIXELS;
                }
                match end - ox {
                    0 => {}
                    1 => self.forward_pixels::<N, 1, STEP>(xp, offsets, weight, bias, y, c, ox, corner(ox)),
                    2 => self.forward_pixels::<N, 2, STEP>(xp, offsets, weight, bias, y, c, ox, corner(ox)),
                    3 => self.forward_pixels::<N, 3, STEP>(xp, offsets, weight, bias, y, c, ox, corner(ox)),
                    4 => self.forward_pixels::<N, 4, STEP>(xp, offsets, weight, bias, y, c, ox, corner(ox)),
                    5 => self.forward_pixels::<N, 5, STEP>(xp, offsets, weight, bias, y, c, ox, corner(ox)),
                    left => unreachable!("{left} pixels left, fewer than FORWARD_PIXELS ({FORWARD_PIXELS})"),
                }
                ox = end;
            }
        }
    }

    /// Channels `c..c + N` of the `P` pixels from `ox` on of one output row `y`, the first
    /// pixel's window corner at `corner`. The caller has checked that the row's windows lie
    /// inside `xp`: the input reads go unchecked (six bounds checks a tap took as many
    /// instructions as its FMAs; the paper's conv1 forward 20.5 -> 18.1 ms per batch of 16 on
    /// one core of a Xeon).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn forward_pixels<const N: usize, const P: usize, const STEP: usize>(
        &self,
        xp: &[f32],
        offsets: &[usize],
        weight: &[f32],
        bias: &[f32],
        y: &mut [f32],
        c: usize,
        ox: usize,
        corner: usize,
    ) {
        let oc = self.out_c;
        let step = if STEP > 0 { STEP } else { self.win.stride * self.in_c };
        let mut acc = [Lanes::<N>::default(); P];
        for (r, off) in offsets.iter().enumerate() {
            let w = load::<N>(weight, r * oc + c);
            for (p, a) in acc.iter_mut().enumerate() {
                // SAFETY: pixel ox + p lies in the row whose windows the caller checked.
                *a = a.mul_add(unsafe { *xp.get_unchecked(corner + off + p * step) }, w);
            }
        }
        let b = load::<N>(bias, c);
        for (p, a) in acc.into_iter().enumerate() {
            let v = a + b;
            store(y, (ox + p) * oc + c, if self.relu { v.relu() } else { v });
        }
    }

    /// Weight gradient of one padded sample, added into `dw`: `dw[r][c] += sum over pixels o of
    /// xp[corner(o) + offset(r)] * dy[o][c]`, over the pixels in chunks of
    /// `WEIGHT_GRAD_PIXELS`, whose output gradient rows stay in L1 while every weight row's
    /// sums go over them. (Over a whole sample at once, the paper's conv1 read its 1.2 MB of
    /// output gradient from L2 once per block of weight rows.) `offsets`: `group_offsets()`.
    fn weight_grad_padded(&self, xp: &[f32], dy: &[f32], pixels: &[(usize, usize)], offsets: &[Vec<usize>], dw: &mut [f32]) {
        let cout_g = self.out_c / self.groups;
        for chunk in pixels.chunks(WEIGHT_GRAD_PIXELS) {
            let farthest = chunk.iter().map(|&(_, corner)| corner).max().unwrap_or(0);
            for (g, offsets) in offsets.iter().enumerate() {
                // What `weight_grad_block` reads without bounds checks: every tap of the
                // chunk's farthest window lies inside the sample.
                let reach = offsets.iter().copied().max().unwrap_or(0);
                assert!(farthest + reach < xp.len(), "the windows lie inside the padded sample");
                let mut r = 0;
                while r < offsets.len() {
                    let block = &offsets[r..];
                    r += if block.len() >= WEIGHT_GRAD_ROWS {
                        self.weight_grad_rows::<WEIGHT_GRAD_ROWS>(xp, dy, chunk, dw, block, r, g * cout_g)
                    } else {
                        self.weight_grad_rows::<1>(xp, dy, chunk, dw, block, r, g * cout_g)
                    };
                }
            }
        }
    }

    /// Weight rows `r..r + T` (at `offsets`) of the group whose channels start at `c0`.
    #[inline(always)]
    fn weight_grad_rows<const T: usize>(
        &self,
        xp: &[f32],
        dy: &[f32],
        pixels: &[(usize, usize)],
        dw: &mut [f32],
        offsets: &[usize],
        r: usize,
        c0: usize,
    ) -> usize {
        let offsets: [usize; T] = offsets[..T].try_into().expect("T rows");
        let cout_g = self.out_c / self.groups;
        // Rows whose taps are neighbours in the sample (one window row of one group, as 55 of
        // the paper's conv1's 60 blocks are) read them at fixed distances from the first: no
        // offsets to load per pixel, which LLVM kept on the stack.
        if offsets.iter().enumerate().all(|(t, &off)| off == offsets[0] + t) {
            for_lane_blocks!(c0..c0 + cout_g, |c, N| self.weight_grad_block::<N, T, true>(xp, dy, pixels, dw, offsets, r, c));
        } else {
            for_lane_blocks!(c0..c0 + cout_g, |c, N| self.weight_grad_block::<N, T, false>(xp, dy, pixels, dw, offsets, r, c));
        }
        T
    }

    /// Weight rows `r..r + T` (at `offsets`), channels `c..c + N`: the sums start from `dw`'s
    /// and stay in registers over `pixels`, whose windows the caller has checked lie inside
    /// `xp`. `NEIGHBOURS`: the taps are `offsets[0] + t`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn weight_grad_block<const N: usize, const T: usize, const NEIGHBOURS: bool>(
        &self,
        xp: &[f32],
        dy: &[f32],
        pixels: &[(usize, usize)],
        dw: &mut [f32],
        offsets: [usize; T],
        r: usize,
        c: usize,
    ) {
        let oc = self.out_c;
        let mut acc: [Lanes<N>; T] = std::array::from_fn(|t| load::<N>(dw, (r + t) * oc + c));
        for &(o, corner) in pixels {
            let d = load::<N>(dy, o * oc + c);
            for (t, a) in acc.iter_mut().enumerate() {
                let at = corner + if NEIGHBOURS { offsets[0] + t } else { offsets[t] };
                // SAFETY: the caller checked that the windows of `pixels` lie inside `xp`.
                *a = a.mul_add(unsafe { *xp.get_unchecked(at) }, d);
            }
        }
        for (t, a) in acc.into_iter().enumerate() {
            store(dw, (r + t) * oc + c, a);
        }
    }

    /// Input gradient of one sample, added into `dx`, through the padded buffer `dxp`:
    /// `dxp[corner(o) + offset(r)] += weight[r] . dy[o]` over each group's channels, weight row
    /// by weight row.
    fn input_grad_padded(&self, weight: &[f32], dy: &[f32], pixels: &[(usize, usize)], dxp: &mut [f32], dx: &mut [f32]) {
        let (cout_g, oc) = (self.out_c / self.groups, self.out_c);
        dxp.fill(0.0);
        for g in 0..self.groups {
            let channels = g * cout_g..(g + 1) * cout_g;
            for (r, off) in self.row_offsets(g).into_iter().enumerate() {
                let w = &weight[r * oc..][channels.clone()];
                for &(o, corner) in pixels {
                    let d = &dy[o * oc..][channels.clone()];
                    dxp[corner + off] += w.iter().zip(d).map(|(w, d)| w * d).sum::<f32>();
                }
            }
        }
        self.add_unpadded(dxp, dx);
    }
}
