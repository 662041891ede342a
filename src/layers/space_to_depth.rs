//! A strided convolution rewritten as a stride-1 one, so that Winograd applies to it: each
//! `s x s` block of input pixels (s the stride) becomes one pixel of `s * s * in_c` channels,
//! and the `k x k` kernel one of `ceil(k / s)` blocks a side, zero where the blocks overhang
//! the kernel. AlexNet's conv1 (227x227x3, 11x11 stride 4, VALID) becomes a 3x3 VALID layer on
//! 57x57x48: Winograd F(7x7, 3x3) then takes 81 multiplications per 49 outputs and channel pair
//! where im2col takes 49 x 9 over these blocks (371 over the real taps: 4.6x fewer, after the
//! 19% of zero taps).
//!
//! Channel `(dy * s + dx) * in_c + c` of block pixel (Y, X) is input pixel
//! (Y s + dy - pad, X s + dx - pad), channel c (zero outside the input): for a fixed dy the
//! `s * in_c` floats are contiguous in the NHWC input, so the rewrite copies runs of them.

use super::conv::Conv;
use super::simd::copy_run;
use super::{Axis, Window};
use rayon::prelude::*;

/// The rewrite of one strided layer.
pub struct SpaceToDepth {
    /// The stride-1 VALID layer on blocks.
    pub inner: Conv,
    /// The strided layer.
    outer: Conv,
}

impl SpaceToDepth {
    /// The rewrite, for a strided layer of one group (towers would interleave each group's
    /// channels with the block offsets).
    pub fn of(conv: &Conv) -> Option<SpaceToDepth> {
        let (s, k) = (conv.win.stride, conv.win.kernel);
        if s < 2 || conv.groups != 1 {
            return None;
        }
        let blocks = k.div_ceil(s);
        // The block rows an output row's window spans start at its own index: out - 1 + blocks.
        let axis = |a: &Axis| Axis { input: a.output - 1 + blocks, output: a.output, pad_before: 0 };
        let win = Window { h: axis(&conv.win.h), w: axis(&conv.win.w), kernel: blocks, stride: 1 };
        let inner = Conv { win, in_c: s * s * conv.in_c, out_c: conv.out_c, groups: 1, relu: conv.relu };
        Some(SpaceToDepth { inner, outer: *conv })
    }

    /// Block pixel column `bx`'s original columns `x0..x1` (clipped to the input) and where the
    /// first lands within the block's run of `s` columns.
    fn columns(&self, bx: usize) -> (usize, usize, usize) {
        let (s, a) = (self.outer.win.stride, &self.outer.win.w);
        let first = (bx * s) as isize - a.pad_before as isize;
        let x0 = first.max(0) as usize;
        let x1 = ((first + s as isize).max(0) as usize).min(a.input);
        (x0, x1.max(x0), (x0 as isize - first) as usize)
    }

    /// Calls `f(slot, run)` for every slot of one sample: the `s * in_c` floats of one block
    /// pixel from one of its rows (offset `dy`), at float offset `slot` of the blocks, and
    /// `run`, unless that row is padding: (original sample float offset, float offset within
    /// the slot, floats), the part of the slot the input covers. The map both directions share.
    fn for_each_slot(&self, mut f: impl FnMut(usize, Option<(usize, usize, usize)>)) {
        let (s, c, inner) = (self.outer.win.stride, self.outer.in_c, &self.inner.win);
        let row_len = self.outer.win.w.input * c;
        for by in 0..inner.h.input {
            for dy in 0..s {
                // The original row at offset dy of block row by, unless it is padding.
                let row = Window::tap(&self.outer.win.h, s, by, dy);
                for bx in 0..inner.w.input {
                    let slot = (by * inner.w.input + bx) * self.inner.in_c + dy * s * c;
                    f(
                        slot,
                        row.map(|row| {
                            let (x0, x1, lead) = self.columns(bx);
                            (row * row_len + x0 * c, lead * c, (x1 - x0) * c)
                        }),
                    );
                }
            }
        }
    }

    /// `batch` samples into blocks (`inner.in_len()` floats each; padding zero). Each slot is
    /// written once, its run copied with vector moves (zeroing all the blocks first wrote them
    /// twice, and AlexNet's conv1 made a `memcpy` call per 12-float run: 208,000 per batch of 16).
    pub fn input(&self, batch: usize, x: &[f32], blocks: &mut [f32]) {
        let (len, inner_len, slot_len) = (self.outer.in_len(), self.inner.in_len(), self.outer.win.stride * self.outer.in_c);
        blocks[..batch * inner_len].par_chunks_mut(inner_len).zip(x.par_chunks(len)).for_each(|(b, x)| {
            self.for_each_slot(|at, run| {
                let slot = &mut b[at..at + slot_len];
                match run {
                    Some((from, lead, n)) => {
                        slot[..lead].fill(0.0);
                        copy_run(&mut slot[lead..lead + n], &x[from..from + n]);
                        slot[lead + n..].fill(0.0);
                    }
                    None => slot.fill(0.0),
                }
            });
        });
    }

    /// The gradient of `batch` samples from their blocks' gradient (input pixels no window
    /// reads get zero).
    pub fn input_grad(&self, batch: usize, d_blocks: &[f32], dx: &mut [f32]) {
        let (len, inner_len) = (self.outer.in_len(), self.inner.in_len());
        dx[..batch * len].par_chunks_mut(len).zip(d_blocks.par_chunks(inner_len)).for_each(|(dx, b)| {
            dx.fill(0.0);
            self.for_each_slot(|at, run| {
                if let Some((from, lead, n)) = run {
                    copy_run(&mut dx[from..from + n], &b[at + lead..at + lead + n]);
                }
            });
        });
    }

    /// Kernel tap (ky, kx, channel c) of block tap (by, bx) and block channel `bc`, if it is a
    /// real tap (not the overhang).
    fn tap(&self, block_tap: usize, bc: usize) -> Option<(usize, usize)> {
        let (s, k, kb, cin) = (self.outer.win.stride, self.outer.win.kernel, self.inner.win.kernel, self.outer.in_c);
        let (by, bx) = (block_tap / kb, block_tap % kb);
        let (d, c) = (bc / cin, bc % cin);
        let (ky, kx) = (by * s + d / s, bx * s + d % s);
        (ky < k && kx < k).then_some((ky * k + kx, c))
    }

    /// HWIO weights into the block kernel's HWIO (overhang zero).
    pub fn weights(&self, w: &[f32], blocks: &mut [f32]) {
        let (cout, bin) = (self.inner.out_c, self.inner.in_c);
        for (i, row) in blocks.chunks_exact_mut(cout).enumerate() {
            match self.tap(i / bin, i % bin) {
                Some((tap, c)) => row.copy_from_slice(&w[(tap * self.outer.in_c + c) * cout..][..cout]),
                None => row.fill(0.0),
            }
        }
    }

    /// The weight gradient from the block kernel's (the overhang's is dropped).
    pub fn weight_grad(&self, d_blocks: &[f32], dw: &mut [f32]) {
        let (cout, bin) = (self.inner.out_c, self.inner.in_c);
        for (i, row) in d_blocks.chunks_exact(cout).enumerate() {
            if let Some((tap, c)) = self.tap(i / bin, i % bin) {
                dw[(tap * self.outer.in_c + c) * cout..][..cout].copy_from_slice(row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Padding;
    use crate::layers::testing::random_vec;

    /// The rewrite is a relabelling: every input float lands in one block channel and comes
    /// back, every weight lands in one block tap and comes back, and the block kernel's sum
    /// over a block window equals the original window's (AlexNet's conv1 and a padded,
    /// ragged one).
    #[test]
    fn blocks_relabel_input_and_weights() {
        for (h, w, k, s, p, c) in
            [(227, 227, 11, 4, Padding::Valid, 3), (17, 14, 5, 2, Padding::Explicit(2), 2), (9, 11, 3, 3, Padding::Same, 1)]
        {
            let conv = Conv { win: Window::new(h, w, k, s, p).unwrap(), in_c: c, out_c: 4, groups: 1, relu: false };
            let s2d = SpaceToDepth::of(&conv).unwrap();
            let x = random_vec(2 * conv.in_len(), 1);
            let mut blocks = vec![f32::NAN; 2 * s2d.inner.in_len()];
            s2d.input(2, &x, &mut blocks);
            let mut back = vec![f32::NAN; x.len()];
            s2d.input_grad(2, &blocks, &mut back);
            assert_eq!(back, x);
            let sum: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((blocks.iter().map(|&v| v as f64).sum::<f64>() - sum).abs() < 1e-6 * x.len() as f64, "every float once");
            let wt = random_vec(conv.weight_len(), 2);
            let mut wb = vec![f32::NAN; s2d.inner.weight_len()];
            s2d.weights(&wt, &mut wb);
            let mut wback = vec![f32::NAN; wt.len()];
            s2d.weight_grad(&wb, &mut wback);
            assert_eq!(wback, wt);
            assert_eq!(wb.iter().filter(|v| **v != 0.0).count(), wt.iter().filter(|v| **v != 0.0).count());
            // Output (last sample, last row and column, channel 3) both ways.
            let (oy, ox, co) = (conv.win.h.output - 1, conv.win.w.output - 1, 3);
            let mut want = 0.0f64;
            for ky in 0..k {
                for kx in 0..k {
                    if let (Some(iy), Some(ix)) = (Window::tap(&conv.win.h, s, oy, ky), Window::tap(&conv.win.w, s, ox, kx)) {
                        for ci in 0..c {
                            want += (x[conv.in_len() + (iy * w + ix) * c + ci] * wt[((ky * k + kx) * c + ci) * 4 + co]) as f64;
                        }
                    }
                }
            }
            let (inner, kb) = (&s2d.inner, s2d.inner.win.kernel);
            let mut got = 0.0f64;
            for t in 0..kb * kb {
                let pix = (oy + t / kb) * inner.win.w.input + ox + t % kb;
                for bc in 0..inner.in_c {
                    got += (blocks[inner.in_len() + pix * inner.in_c + bc] * wb[(t * inner.in_c + bc) * 4 + co]) as f64;
                }
            }
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }
}
