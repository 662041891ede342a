//! A direct convolution and the max-pool after it, as one pass each way (the seed model's conv1
//! and pool1; `Convolution::fuses_with` says when).
//!
//! Forward goes sample by sample: each sample's convolution output rows stay in a per-thread
//! ring, in cache, and only the pooled output and its argmax (for training; inference passes
//! none) reach memory; pooled windows with no live pixel are written as constant rows, with no
//! argmax (training keeps which windows are live instead: `Kept`). (Unfused, the seed model's
//! conv1 writes 12.8 MB per batch of 64, which pool1 reads back and backward reads three more
//! times; 200 MB per inference batch of 1000.)
//!
//! Backward takes the weight and bias gradients straight from the pooled gradient. Each pooled
//! gradient `d[q][c]` reaches one convolution output, at the pixel its argmax names, so
//!
//! ```text
//! dw[.][c] += d[q][c] * patch(pixel(q, argmax[q][c]))
//! ```
//!
//! with no pass that routes the gradient onto the convolution's output first. (That pass read
//! each pooled row once per window pixel and was half the pair's time.) With one input channel
//! (the seed model's conv1) and AVX-512 or AVX2, lanes run over channels and each lane looks
//! its patch up in the pooled output's input neighbourhood, held by the column of the taps in
//! a register each (`Neighbourhoods`); otherwise it is one multiply-add of a patch row (lanes
//! over the patch) per pooled output and channel (`Routes`). The input gradient, which a first
//! layer does not need, still goes through the routed output gradient.

use super::aligned::AlignedBuf;
use super::conv::{Conv, per_range_backward};
use super::direct_conv::LiveColumns;
use super::pool::{MaxPool, NOWHERE, max_pool_backward_sample, pool_window};
use super::scratch::{ALIGN_SLACK, SCRATCH_A, aligned, aligned_copy, give_back, take, take_zeroed, with_scratch};
use super::simd::{
    Lanes, copy_run, for_lane_blocks, load, pack_columns, permute_block, prefetch, store, stream_copy, stream_fence, touch_lines,
};
use super::{Axis, WindowTable};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A direct convolution and the max-pool after it, with what both passes need of their
/// windows worked out once per layer. (Built per call, the tables took 20 us of a 0.5-0.8 ms
/// forward inside the training step on an Emerald Rapids Xeon, 5 us warm; the 8-lane weight
/// gradient's `Routes` are 196 KB for the seed model's conv1.) `W` is the vector width of the
/// weight gradient: at 16, and at 8 with AVX2, `Neighbourhoods` where they apply, else
/// `Routes`' patch rows of `W` lanes (the same bits either way). The engine uses the target's
/// `L`, the tests both widths.
pub struct ConvPool<const W: usize> {
    conv: Conv,
    pool: MaxPool,
    /// The pool's windows with their input pixels placed in the forward's ring of convolution
    /// rows.
    ring_windows: WindowTable,
    /// The convolution's output rows and columns each pooled row and column covers
    /// (`Window::input_ranges`).
    pool_rows: Vec<Range<usize>>,
    pool_cols: Vec<Range<usize>>,
    /// `Conv::group_offsets`.
    offsets: Vec<Vec<usize>>,
    weight_grad: WeightGrad<W>,
}

impl<const W: usize> ConvPool<W> {
    /// `conv` and `pool` (whose input is `conv`'s output) with their tables.
    pub fn new(conv: &Conv, pool: &MaxPool) -> ConvPool<W> {
        let (kp, w) = (pool.win.kernel, pool.win.w.input);
        // A convolution of one input channel looks its patches up in each pooled output's
        // neighbourhood at 16 lanes (a zmm register holds each of its three columns; without
        // AVX-512, lane by lane, which the tests run on any machine) and at 8 where AVX2
        // permutes them; others, and 8 lanes elsewhere, use patch rows.
        let lookups = W == 16 || (W == 8 && Lanes::<W>::PERMUTES_NEIGHBOURHOODS);
        let weight_grad = match lookups.then(|| Neighbourhoods::new(conv, pool)).flatten() {
            Some(neighbourhoods) => WeightGrad::Neighbourhoods(neighbourhoods),
            None => WeightGrad::Patches(Routes::new(conv, pool)),
        };
        ConvPool {
            conv: *conv,
            pool: *pool,
            ring_windows: pool.win.table().map_inputs(|i| (i / w % kp) * w + i % w),
            pool_rows: pool.win.input_ranges(&pool.win.h),
            pool_cols: pool.win.input_ranges(&pool.win.w),
            offsets: conv.group_offsets(),
            weight_grad,
        }
    }

    /// Whether this pair's pool is `pool`.
    pub fn pools_with(&self, pool: &MaxPool) -> bool {
        (self.pool.win, self.pool.channels) == (pool.win, pool.channels)
    }

    /// The pooled output of a window with no live pixel: all its outputs equal relu?(bias), so
    /// that is their maximum.
    fn empty_value(&self, bias: &[f32]) -> Vec<f32> {
        bias.iter().map(|&b| if self.conv.relu { b.max(0.0) } else { b }).collect()
    }

    /// By channel, `NOWHERE` where a window with no live pixel has no argmax (the ReLU zeroes
    /// its maximum, relu(bias)), else 0: where it has one, it is the window's first tap, which
    /// `fill_empty_argmax` puts in.
    fn empty_nowhere(&self, bias: &[f32]) -> Vec<u8> {
        self.empty_value(bias).iter().map(|&v| if self.conv.relu && v <= 0.0 { NOWHERE } else { 0 }).collect()
    }

    /// By pooled output, the first tap of its window (for `fill_empty_argmax`).
    fn first_taps(&self) -> Vec<u8> {
        let mut first = Vec::with_capacity(self.pool.win.out_pixels());
        self.ring_windows.for_each(|_, taps| first.push(taps[0].0 as u8));
        first
    }

    /// Words of `Kept::active` a sample: a bit per pooled output.
    pub fn active_words(&self) -> usize {
        self.pool.win.out_pixels().div_ceil(64)
    }

    /// Forward over a batch: `pooled = max_pool(relu?(conv(input, weight) + bias))`, with what
    /// the backward needs where asked (training: `Kept`).
    pub fn forward(&self, batch: usize, input: &[f32], weight: &[f32], bias: &[f32], pooled: &mut [f32], kept: Option<Kept>) {
        let (conv, pool) = (&self.conv, &self.pool);
        let (il, pl, c) = (conv.in_len(), pool.out_len(), conv.out_c);
        let mut weight_copy = take(weight.len() + ALIGN_SLACK);
        let weight = &*aligned_copy(&mut weight_copy, weight);
        // The convolution's output rows go through a ring of as many rows as a pool window
        // has, each computed just before the first pooled row that reads it: 21 KB for the
        // seed model's conv1, which stays in L1, where a whole sample's output (200 KB) goes
        // through L2. (Probe, Zen 4 EPYC: the forward 3-6% faster with the caches flushed
        // between passes, the same with them warm.)
        let (kp, row_len) = (pool.win.kernel, pool.win.w.input * c);
        let empty_value = self.empty_value(bias);
        let sample = |state: &mut SampleState, n: usize, p: &mut [f32], mut idx: Option<&mut [u8]>, active: Option<&mut [u64]>| {
            let SampleState { ring, live, values, argmax } = state;
            conv.with_padded(&input[n * il..(n + 1) * il], |xp| {
                live.find(conv, &self.pool_rows, &self.pool_cols, xp);
                if let Some(active) = active {
                    mark_active(&live.active, active);
                }
                let (mut done, mut active) = (0, live.active.iter().peekable());
                // The pooled row and column of q, counted: a division per pooled output (and the
                // byte loop `fill_empty_argmax` replaced) took a tenth of the warm forward's
                // profile samples on the Xeon.
                let (mut row, mut col) = (0, 0);
                self.ring_windows.for_each(|q, taps| {
                    // Pooled row i reads the convolution's rows up to pool_rows[i].end.
                    let needed = self.pool_rows[row].end;
                    col += 1;
                    if col == pool.win.w.output {
                        (row, col) = (row + 1, 0);
                    }
                    if needed > done {
                        let read = &live.read;
                        conv.forward_padded(
                            xp,
                            &live.live,
                            &self.offsets,
                            weight,
                            bias,
                            done..needed,
                            ring,
                            |oy| (oy % kp) * row_len,
                            |oy| read[oy].clone(),
                        );
                        done = needed;
                    }
                    // The window's output goes through `values` and `argmax` (in L1) to streaming
                    // stores: the batch's output (4 MB for the seed model's conv1) is far from
                    // the cache when a training step starts, and ordinary stores would read
                    // each line first. A pooled 0 copied an output the ReLU zeroed, whose
                    // gradient is 0: its argmax becomes one no pixel has, so backward routes
                    // nothing there without a test. An inactive window's argmax follows from
                    // the bias (`Kept`), and is not written.
                    let p = &mut p[q * c..(q + 1) * c];
                    if active.next_if_eq(&&(q as u32)).is_some() {
                        pool_window(ring, taps, c, conv.relu, values, argmax);
                        stream_copy(p, values);
                        if let Some(idx) = idx.as_deref_mut() {
                            stream_copy(&mut idx[q * c..(q + 1) * c], argmax);
                        }
                    } else {
                        stream_copy(p, &empty_value);
                    }
                });
            });
        };
        // Each thread takes the next sample not yet taken, until none are left, with its ring
        // and lists set up once: a thread that starts late (a sleeping worker takes 15-20 us to
        // wake) or runs slow takes fewer samples. (Split in two halves, the two threads' ends
        // were 60 us apart, of 0.6-0.8 ms, inside the step on the Xeon.) Inference keeps
        // nothing: each window's argmax stays in `SampleState::argmax`.
        let (pooled, words) = (pooled[..batch * pl].chunks_mut(pl), self.active_words());
        let outputs: Vec<SampleOutput> = match kept {
            Some(Kept { argmax, active }) => pooled
                .zip(argmax[..batch * pl].chunks_mut(pl).zip(active[..batch * words].chunks_mut(words)))
                .map(|(p, kept)| Mutex::new((p, Some(kept))))
                .collect(),
            None => pooled.map(|p| Mutex::new((p, None))).collect(),
        };
        let next = AtomicUsize::new(0);
        (0..rayon::current_num_threads().min(batch)).into_par_iter().for_each(|_| {
            let mut state = SampleState {
                ring: AlignedBuf::zeroed(kp * row_len),
                live: LiveWindows::default(),
                values: AlignedBuf::zeroed(c),
                argmax: AlignedBuf::zeroed(c),
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(output) = outputs.get(n) else { break };
                let mut output = output.lock().unwrap_or_else(|e| e.into_inner());
                let (p, kept) = &mut *output;
                let (idx, active) = kept.as_mut().map(|(idx, active)| (&mut **idx, &mut **active)).unzip();
                sample(&mut state, n, p, idx, active);
            }
            stream_fence();
        });
        give_back(weight_copy);
    }

    /// Backward of `forward` (with the same `weight` and `bias`): overwrites `d_bias` and
    /// whichever of `d_input`, `d_weight` is given, from the pooled gradient and what the
    /// forward kept (`Kept`'s two buffers). Sums run over the samples of each thread's range in
    /// order, and within a sample over the pooled outputs in order, so a thread count gives the
    /// same bits every time.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        batch: usize,
        input: &[f32],
        weight: &[f32],
        bias: &[f32],
        d_pooled: &[f32],
        argmax: &[u8],
        active: &[u64],
        d_input: Option<&mut [f32]>,
        d_weight: Option<&mut [f32]>,
        d_bias: &mut [f32],
    ) {
        let (conv, pool) = (&self.conv, &self.pool);
        let (il, pl, words) = (conv.in_len(), pool.out_len(), self.active_words());
        let empty = self.empty_nowhere(bias);
        let gather = d_input.is_some().then(|| (conv.corners(), pool.win.inverse_table(), self.first_taps()));
        per_range_backward(conv, batch, d_input, d_weight, Some(d_bias), |range, _, mut dx, mut dw, db| {
            let db = db.expect("the bias gradient is asked for");
            // Patch rows sum into a transposed weight gradient, added into `dw` after the range.
            let mut dwt = match (&self.weight_grad, dw.is_some()) {
                (WeightGrad::Patches(routes), true) => Some(take_zeroed(conv.out_c * routes.row_stride())),
                _ => None,
            };
            let (mut windows, mut live, mut found, mut whole) = (Vec::new(), LiveColumns::default(), Vec::new(), Vec::new());
            for (j, n) in range.enumerate() {
                let (x, at) = (&input[n * il..(n + 1) * il], n * pl..(n + 1) * pl);
                let (d, idx) = (&d_pooled[at.clone()], &argmax[at]);
                // Read in order first: the layer above wrote the pooled gradient just before,
                // and it is in L2 or L3, but the passes below read it a lane block at a time
                // (at 64 channels and 16 lanes, every fourth line), an order the hardware
                // prefetchers do not follow; after one sequential pass they find it in L1 and L2.
                // (Inside the training step on a Zen 4 EPYC, the seed model's conv1 + pool1
                // backward 0.80x the time, over 12 alternating pairs.)
                touch_lines(d);
                // The forward's active pooled outputs: the only ones whose patches are not zeros.
                active_list(&active[n * words..(n + 1) * words], &mut windows);
                match (&self.weight_grad, dw.as_deref_mut(), dwt.as_deref_mut()) {
                    (WeightGrad::Neighbourhoods(nb), Some(dw), _) => nb.grads_sample::<W>(x, d, idx, &windows, &empty, &mut found, dw, db),
                    (WeightGrad::Patches(routes), _, Some(dwt)) => {
                        routed_bias_grad(d, idx, &windows, &empty, db);
                        routes.weight_grad_sample(x, &self.offsets, d, idx, &windows, &mut live, dwt);
                    }
                    _ => routed_bias_grad(d, idx, &windows, &empty, db),
                }
                if let (Some(dx), Some((corners, inverse, first_taps))) = (dx.as_deref_mut(), &gather) {
                    // The convolution's output gradient, and the pixels it reached, for the
                    // direct input gradient, through every pooled output's argmax: the
                    // inactive ones' filled in.
                    whole.clear();
                    whole.extend_from_slice(idx);
                    each_in_order(&windows, first_taps.len(), |q, k| {
                        if k.is_none() {
                            fill_empty_argmax(&mut whole[q * conv.out_c..(q + 1) * conv.out_c], &empty, first_taps[q]);
                        }
                    });
                    let mut d_conv = take(conv.out_len());
                    let mut pixels = Vec::with_capacity(corners.len());
                    max_pool_backward_sample(pool, inverse, d, &whole, &mut d_conv, |o, nonzero| {
                        if nonzero {
                            pixels.push(corners[o]);
                        }
                    });
                    conv.direct_backward_sample(x, weight, &d_conv, &pixels, None, Some(&mut dx[j * il..(j + 1) * il]));
                    give_back(d_conv);
                }
            }
            if let (WeightGrad::Patches(routes), Some(dw), Some(dwt)) = (&self.weight_grad, dw, dwt) {
                routes.add_transposed(&dwt, dw);
                give_back(dwt);
            }
        });
    }
}

/// The argmax of a pooled output whose window has no live pixel: its first tap, or `NOWHERE`
/// on the channels whose `nowhere` byte is set (where the ReLU zeroed relu(bias)). In blocks of
/// 64 bytes, which LLVM turns into whole-register selects (over the whole row it used 8-byte
/// ones).
fn fill_empty_argmax(idx: &mut [u8], nowhere: &[u8], first: u8) {
    let select = |(i, &nowhere): (&mut u8, &u8)| *i = (NOWHERE & nowhere) | (first & !nowhere);
    let (blocks, rest) = idx.as_chunks_mut::<64>();
    let (nowhere_blocks, nowhere_rest) = nowhere.as_chunks::<64>();
    for (block, nowhere) in blocks.iter_mut().zip(nowhere_blocks) {
        block.iter_mut().zip(nowhere).for_each(select);
    }
    rest.iter_mut().zip(nowhere_rest).for_each(select);
}

/// What each of the forward's threads keeps across its samples: the ring of convolution rows,
/// the live windows, and one pooled output's values and argmax on their way out (on cache
/// lines, so that no vector load or store of them spans two).
struct SampleState {
    ring: AlignedBuf<f32>,
    live: LiveWindows,
    values: AlignedBuf<f32>,
    argmax: AlignedBuf<u8>,
}

/// What training's forward keeps for the backward: `ConvPool::active_words` a sample, a bitmask
/// of its active pooled outputs (`LiveWindows::active`), so that the backward need not search
/// each sample for them again (that search was an eighth of the seed model's conv1 backward),
/// and the argmax of each active pooled output (where the ReLU zeroed the maximum, `NOWHERE`).
/// The inactive ones' argmax rows are not written: their windows hold no live pixel, so the
/// argmax is the first tap, or `NOWHERE` on the channels the ReLU zeroes
/// (`ConvPool::empty_nowhere`), and the backward takes it from the bias (their 64 bytes were a
/// ninth of what the seed model's conv1 writes).
pub struct Kept<'a> {
    pub argmax: &'a mut [u8],
    pub active: &'a mut [u64],
}

/// One sample's pooled output and, when training, its part of `Kept`: the forward's thread
/// that takes the sample locks it (`ConvPool::forward`).
type SampleOutput<'a> = Mutex<(&'a mut [f32], Option<(&'a mut [u8], &'a mut [u64])>)>;

/// Set `bits` (a sample's words of `Kept::active`) to the pooled outputs `active`: bit q % 64 of
/// word q / 64.
fn mark_active(active: &[u32], bits: &mut [u64]) {
    bits.fill(0);
    for &q in active {
        bits[q as usize / 64] |= 1 << (q % 64);
    }
}

/// The pooled outputs whose bits are set in `bits` (`mark_active`), in order, into `list`.
fn active_list(bits: &[u64], list: &mut Vec<u32>) {
    list.clear();
    for (w, &word) in bits.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            list.push((w * 64) as u32 + rest.trailing_zeros());
            rest &= rest - 1;
        }
    }
}

/// `visit(q, Some(k))` for each active pooled output (`active[k] == q`, in order) and
/// `visit(q, None)` for the others, over the pooled outputs `0..outputs` in order: the inactive
/// ones between two active ones as a run, with no test each.
#[inline(always)]
fn each_in_order(active: &[u32], outputs: usize, mut visit: impl FnMut(usize, Option<usize>)) {
    let mut from = 0;
    for (k, &q) in active.iter().enumerate() {
        (from..q as usize).for_each(|i| visit(i, None));
        visit(q as usize, Some(k));
        from = q as usize + 1;
    }
    (from..outputs).for_each(|i| visit(i, None));
}

/// One sample's live windows, from its padded copy: those of the convolution's output pixels
/// (`Conv::find_live`), and `active`, in order, the pooled outputs whose window meets the span
/// of the live columns of its rows. (MNIST digits leave 58% of pool1's windows inactive: their
/// outputs are relu(bias) and their patches zeros. A window inside a span that holds no live
/// pixel is counted active, and comes out the same: relu(bias), the same argmax, zero patches.)
#[derive(Default)]
struct LiveWindows {
    live: LiveColumns,
    active: Vec<u32>,
    /// `read[oy]`: the span of the columns of convolution row oy that active pooled outputs
    /// read and of its live ones: the only ones the forward writes.
    read: Vec<Range<usize>>,
}

impl LiveWindows {
    /// `pool_rows`, `pool_cols`: the convolution's output rows and columns each pooled row and
    /// column covers (`Window::input_ranges`).
    fn find(&mut self, conv: &Conv, pool_rows: &[Range<usize>], pool_cols: &[Range<usize>], xp: &[f32]) {
        conv.find_live(xp, &mut self.live);
        self.active.clear();
        self.read.clone_from(&self.live.rows);
        for (i, rows) in pool_rows.iter().enumerate() {
            // The span of the live columns of the window's rows, and the pooled columns whose
            // windows meet it: with both ends of the windows increasing, a run. (Per row, a
            // run each and their union took a fifth of the forward.)
            let Some(span) = self.live.rows[rows.clone()].iter().fold(None, hull) else { continue };
            let (a, b) = (pool_cols.partition_point(|c| c.end <= span.start), pool_cols.partition_point(|c| c.start < span.end));
            if a < b {
                self.active.extend((a..b).map(|j| (i * pool_cols.len() + j) as u32));
                let columns = pool_cols[a].start..pool_cols[b - 1].end;
                for read in &mut self.read[rows.clone()] {
                    *read = hull(Some(columns.clone()), read).expect("columns is not empty");
                }
            }
        }
    }
}

/// The span of `a` and `b`, of which empty ones take no part (`None`: both empty).
fn hull(a: Option<Range<usize>>, b: &Range<usize>) -> Option<Range<usize>> {
    match a {
        _ if b.is_empty() => a,
        Some(a) if !a.is_empty() => Some(a.start.min(b.start)..a.end.max(b.end)),
        _ => Some(b.clone()),
    }
}

/// Add, over the pooled outputs of one sample in order, the gradients that reached a
/// convolution output (argmax not `NOWHERE`) into `db`: the bias gradient. The `active` pooled
/// outputs' argmax is in `idx`; the others' is `empty` (`ConvPool::empty_nowhere`).
fn routed_bias_grad(d: &[f32], idx: &[u8], active: &[u32], empty: &[u8], db: &mut [f32]) {
    let (oc, outputs) = (empty.len(), d.len() / empty.len());
    for_lane_blocks!(0..oc, |c, N| {
        let at = |q: usize| -> &[f32; N] { d[q * oc + c..][..N].try_into().expect("N") };
        let (arg, empty) =
            (|q: usize| -> &[u8; N] { idx[q * oc + c..][..N].try_into().expect("N") }, empty[c..c + N].try_into().expect("N"));
        let mut sum = load::<N>(db, c);
        // The next active output's argmax row, at no stride a prefetcher would follow, is asked
        // for while the inactive ones before it add up (as `Neighbourhoods::grads_sample` does).
        let ahead = |k: usize| {
            if let Some(&q) = active.get(k) {
                prefetch(arg(q as usize));
            }
        };
        ahead(0);
        each_in_order(active, outputs, |q, k| match k {
            Some(k) => {
                ahead(k + 1);
                sum = sum.add_unless(at(q), arg(q), NOWHERE);
            }
            None => sum = sum.add_unless(at(q), empty, NOWHERE),
        });
        store(db, c, sum);
    });
}

/// How the weight gradient finds each pooled gradient's patch (`ConvPool::backward`).
enum WeightGrad<const W: usize> {
    Neighbourhoods(Neighbourhoods),
    Patches(Routes<W>),
}

/// Taps of the convolutions `Neighbourhoods` serves: 3x3 of one input channel.
const NEIGHBOURHOOD_TAPS: usize = 9;

/// One pooled output's input neighbourhood (`Neighbourhoods`) by the column of the
/// convolution's taps: for tap column kx, the neighbourhood's rows, each the `kp` floats that
/// tap reads for the pool's columns of pixels, one after another (15 floats under a 3x3 pool of
/// stride 2 over a 3x3 convolution of stride 1); 16 floats, one cache line, a column.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Neighbourhood([[f32; 16]; 3]);

/// The weight gradient of a 3x3 convolution of one input channel (the seed model's conv1) by
/// lookups, lanes over channels. The pixels of a pooled output's window and their patches
/// lie in a `side` x `side` block of the padded input (5 x 5 under a 3x3 pool of stride 2),
/// which, by tap column, three columns of 16 floats hold (`Neighbourhood`), so each lane
/// finds its channel's patch value for every tap by a permute of that tap's column:
///
/// ```text
/// dw[3 ky + kx][c] += d[q][c] * neighbourhood(q)[kx][ky * kp + base[argmax[q][c]]]
/// ```
///
/// per 16 channels and tap a permute and an FMA (8 channels: a permute, a blend and an FMA),
/// where `Routes` loads an index and a patch row per channel and pooled output
/// (four loads, which bound it; the pair's backward on one core of an Emerald Rapids Xeon, 32
/// MNIST digits, 0.38 -> 0.24 ms). The sums run in `Routes`' order, so both give the same
/// bits.
struct Neighbourhoods {
    conv: Conv,
    side: usize,
    /// By pool tap (py * kp + px of the pool's window): the index of its pixel's patch corner
    /// in a column, 8 at most (`Lanes::neighbourhood_mul_add`).
    base: [u32; 16],
    /// The floats of a column a row: `kp`. Tap (ky, kx) reads column kx from row ky on.
    row_step: usize,
    /// By column float (16 * kx + i): the float of the `side` x `side` block (rows one after
    /// another) it holds, `side * side` (a zero) where it holds none.
    sources: [[u8; 16]; 3],
    /// By pooled output: its neighbourhood's first row and column in the padded sample
    /// (negative before it), worked out once a pass (two divisions a pooled output were 2.5%
    /// of the backward).
    corners: Vec<[isize; 2]>,
}

impl Neighbourhoods {
    /// `None` unless `conv` is 3x3 over one input channel and a pool window (3x3 at most) has
    /// its patches in a block of fewer than 32 floats, columns of 16, and its taps' corners 8
    /// at most.
    fn new(conv: &Conv, pool: &MaxPool) -> Option<Neighbourhoods> {
        let (kp, s) = (pool.win.kernel, conv.win.stride);
        let side = (kp - 1) * s + conv.win.kernel;
        if conv.in_c != 1 || conv.groups != 1 || conv.patch_len() != NEIGHBOURHOOD_TAPS || kp > 3 || side * side >= 32 || side * kp > 16 {
            return None;
        }
        // Column kx holds, row by row, the floats at kx, kx + s, ... kx + (kp - 1) s of each
        // block row: tap (ky, kx) of pool tap (py, px) reads block row py s + ky, column px s +
        // kx, which is float (py s + ky) kp + px of column kx.
        let mut base = [0; 16];
        for (t, corner) in base.iter_mut().enumerate().take(kp * kp) {
            *corner = u32::try_from(t / kp * s * kp + t % kp).ok()?;
        }
        // What `Lanes::neighbourhood_mul_add` asks of them (a 3x3 pool's at most 8).
        if base.iter().any(|&b| b > 8) {
            return None;
        }
        let sources = std::array::from_fn(|kx| {
            std::array::from_fn(|i| {
                let (row, px) = (i / kp, i % kp);
                u8::try_from(if row < side { row * side + px * s + kx } else { side * side }).expect("below 32")
            })
        });
        let pw = &pool.win;
        let first = |o: usize, axis: &Axis| ((o * pw.stride) as isize - axis.pad_before as isize) * s as isize;
        let corners = (0..pw.out_pixels()).map(|q| [first(q / pw.w.output, &pw.h), first(q % pw.w.output, &pw.w)]).collect();
        Some(Neighbourhoods { conv: *conv, side, base, row_step: kp, sources, corners })
    }

    /// One sample's bias and weight gradients, added into `db` and `dw` (`[patch row][out_c]`):
    /// the bias's over every pooled output, the weights' over the `active` ones, whose argmax
    /// is in `idx` (the others': `empty`, as in `routed_bias_grad`; `found`: scratch for the
    /// neighbourhoods). One pass over the pooled gradient does both: in a pass of its own, the
    /// bias gradient's first touch of it was a third of the backward, and the weights' went
    /// back to it.
    #[allow(clippy::too_many_arguments)]
    fn grads_sample<const W: usize>(
        &self,
        x: &[f32],
        d: &[f32],
        idx: &[u8],
        active: &[u32],
        empty: &[u8],
        found: &mut Vec<Neighbourhood>,
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let oc = self.conv.out_c;
        self.conv.with_padded(x, |xp| {
            // Packed in place: returned by value, each went through the stack twice. Their
            // argmax rows, which the loop below reads at no stride a prefetcher would follow,
            // are asked for meanwhile.
            found.resize(active.len(), Neighbourhood([[0.0; 16]; 3]));
            for (nb, &q) in found.iter_mut().zip(active) {
                prefetch(&idx[q as usize * oc..(q as usize + 1) * oc]);
                self.neighbourhood(xp, q as usize, nb);
            }
        });
        // `W` lanes a block (at 8, two would hold 18 sums: more than AVX2's 16 registers).
        let mut c = 0;
        while c < oc {
            c += if oc - c >= W {
                self.grads_block::<W>(d, idx, active, empty, found, dw, db, c)
            } else {
                self.grads_block::<1>(d, idx, active, empty, found, dw, db, c)
            };
        }
    }

    /// Channels `c..c + N` of `grads_sample`, the sums in registers. Returns `N`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn grads_block<const N: usize>(
        &self,
        d: &[f32],
        idx: &[u8],
        active: &[u32],
        empty: &[u8],
        found: &[Neighbourhood],
        dw: &mut [f32],
        db: &mut [f32],
        c: usize,
    ) -> usize {
        let (oc, outputs) = (self.conv.out_c, self.corners.len());
        let at = |q: usize| -> &[f32; N] { d[q * oc + c..][..N].try_into().expect("N") };
        let (arg, empty) =
            (|q: usize| -> &[u8; N] { idx[q * oc + c..][..N].try_into().expect("N") }, empty[c..c + N].try_into().expect("N"));
        let (mut acc, mut sum) = ([Lanes::<N>::default(); NEIGHBOURHOOD_TAPS], load::<N>(db, c));
        // The bias's sum goes over the pooled outputs in order (`routed_bias_grad`'s), the
        // inactive ones adding only their gradient.
        each_in_order(active, outputs, |q, k| match k {
            Some(k) => Lanes::neighbourhood_mul_add(&mut acc, &mut sum, &found[k].0, at(q), arg(q), &self.base, self.row_step, NOWHERE),
            None => sum = sum.add_unless(at(q), empty, NOWHERE),
        });
        store(db, c, sum);
        for (r, a) in acc.into_iter().enumerate() {
            store(dw, r * oc + c, load::<N>(dw, r * oc + c) + a);
        }
        N
    }

    /// Pooled output `q`'s neighbourhood in the padded sample `xp`: the rows and columns from
    /// its window's first pixel's patch corner (before the sample where the pool pads), zeros
    /// outside `xp`, into `nb`'s columns (all of it).
    fn neighbourhood(&self, xp: &[f32], q: usize, nb: &mut Neighbourhood) {
        let ((hp, wp), side, [y0, x0]) = (self.conv.padded_dims(), self.side, self.corners[q]);
        if y0 >= 0 && x0 >= 0 && y0 as usize + side <= hp && x0 as usize + side <= wp {
            // Inside the padded sample: row by row, no clipping (all but the windows at the
            // far edges, where the pool pads).
            pack_columns(&mut nb.0, xp, y0 as usize * wp + x0 as usize, wp, side, &self.sources);
            return;
        }
        let mut block = [0.0; 32];
        let (from, to) = (x0.max(0), (x0 + side as isize).min(wp as isize));
        for r in 0..side {
            let y = y0 + r as isize;
            if (0..hp as isize).contains(&y) && from < to {
                let at = y as usize * wp;
                copy_run(&mut block[r * side + (from - x0) as usize..][..(to - from) as usize], &xp[at + from as usize..at + to as usize]);
            }
        }
        permute_block(&mut nb.0, &block, &self.sources);
    }
}

/// Where each pooled output's argmax sends its gradient, for the weight gradient:
/// `blocks[q][a]` is the first lane block, in a sample's patch matrix of `row_stride() / W`
/// blocks per pixel, of the patch of the pixel that pooled output q's tap `a` covers. An argmax of
/// `NOWHERE`, or of a tap outside the input, gets the zero row past the last pixel's. A row
/// for every byte value (not just the window's taps) makes the argmax an index that needs no
/// bounds check, and costs two cache lines per pooled output.
struct Routes<const W: usize> {
    conv: Conv,
    blocks: Vec<[u32; 256]>,
}

impl<const W: usize> Routes<W> {
    fn new(conv: &Conv, pool: &MaxPool) -> Routes<W> {
        let nb = conv.patch_len().div_ceil(W);
        let block = |pixel: usize| u32::try_from(pixel * nb).expect("a sample's patch blocks fit 32 bits");
        let mut blocks = vec![[block(conv.win.out_pixels()); 256]; pool.win.out_pixels()];
        pool.win.for_each_window(|q, window| window.iter().for_each(|&(t, p)| blocks[q][t] = block(p)));
        Routes { conv: *conv, blocks }
    }

    /// Floats per channel of the transposed weight gradient, and per pixel of the patch
    /// matrix: the patch rounded up to lanes.
    fn row_stride(&self) -> usize {
        self.conv.patch_len().div_ceil(W) * W
    }

    /// One sample's weight gradient, added into `dwt` (`[out_c][row_stride]`). Only the
    /// `active` pooled outputs are visited: the others' patches are zeros. `offsets`:
    /// `Conv::group_offsets`, for the patch rows; `live`: this thread's, for the sample's live
    /// columns.
    #[allow(clippy::too_many_arguments)]
    fn weight_grad_sample(
        &self,
        x: &[f32],
        offsets: &[Vec<usize>],
        d: &[f32],
        idx: &[u8],
        active: &[u32],
        live: &mut LiveColumns,
        dwt: &mut [f32],
    ) {
        let conv = &self.conv;
        let (opix, stride) = (conv.win.out_pixels(), self.row_stride());
        let cout_g = conv.out_c / conv.groups;
        conv.with_padded(x, |xp| {
            conv.find_live(xp, live);
            // Each pixel's patch row, then the zero row.
            with_scratch(&SCRATCH_A, (opix + 1) * stride + ALIGN_SLACK, |patches| {
                let patches = aligned(patches, (opix + 1) * stride);
                for (g, offsets) in offsets.iter().enumerate() {
                    conv.patch_rows(xp, live, offsets, stride, patches);
                    let patches = patches.as_chunks::<W>().0;
                    for b in 0..stride / W {
                        // Eight channels' accumulators at a time: with sixteen, LLVM kept them
                        // in memory.
                        let mut c = g * cout_g;
                        while c < (g + 1) * cout_g {
                            c += if (g + 1) * cout_g - c >= 8 {
                                self.weight_grad_block::<8>(patches, active, d, idx, c, b, dwt)
                            } else {
                                self.weight_grad_block::<1>(patches, active, d, idx, c, b, dwt)
                            };
                        }
                    }
                }
            });
        });
    }

    /// Channels `c0..c0 + C`, lane block `b` of the patch: one accumulator per channel, in
    /// registers, over the `active` pooled outputs in order. Returns `C`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn weight_grad_block<const C: usize>(
        &self,
        patches: &[[f32; W]],
        active: &[u32],
        d: &[f32],
        idx: &[u8],
        c0: usize,
        b: usize,
        dwt: &mut [f32],
    ) -> usize {
        let oc = self.conv.out_c;
        // What the loop reads without bounds checks: every entry of `blocks` is a pixel's first
        // block, the zero row's at most, and `b` one of its blocks. (Checked, each channel took
        // a compare and a branch: two of the loop's seven instructions.)
        let zero_row = self.conv.win.out_pixels() * (self.row_stride() / W);
        assert!(zero_row + b < patches.len(), "the patch matrix holds every pixel's blocks and the zero row");
        let mut acc = [Lanes::<W>::default(); C];
        for &q in active {
            let (q, at) = (q as usize, q as usize * oc + c0);
            let (blocks, g, arg): (&[u32; 256], &[f32; C], &[u8; C]) =
                (&self.blocks[q], d[at..at + C].try_into().expect("C"), idx[at..at + C].try_into().expect("C"));
            for c in 0..C {
                // SAFETY: `Routes::new` writes no block past the zero row's, checked above.
                let patch = unsafe { *patches.get_unchecked(blocks[arg[c] as usize] as usize + b) };
                acc[c] = acc[c].mul_add(g[c], Lanes(patch));
            }
        }
        let stride = self.row_stride();
        for (c, a) in acc.into_iter().enumerate() {
            let at = (c0 + c) * stride + b * W;
            store(dwt, at, load::<W>(dwt, at) + a);
        }
        C
    }

    /// `dw[r][c] += dwt[c][r]` over the patch.
    fn add_transposed(&self, dwt: &[f32], dw: &mut [f32]) {
        let (pl, oc, stride) = (self.conv.patch_len(), self.conv.out_c, self.row_stride());
        for (c, row) in dwt.chunks(stride).enumerate() {
            for (r, v) in row[..pl].iter().enumerate() {
                dw[r * oc + c] += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::{MODEL_NAMES, architecture};
    use crate::layers::conv::{direct_forward, im2col_backward, relu_bias_backward};
    use crate::layers::pool::{MAX_KERNEL, max_pool_backward, max_pool_forward};
    use crate::layers::testing::random_vec;
    use crate::layers::{Padding, Window};
    use crate::model::Model;

    /// The fused pair against the layers one after the other (direct forward, max-pool,
    /// max-pool backward, ReLU mask, im2col backward): the same pooled outputs, the same argmax
    /// (or `NOWHERE` where the ReLU zeroed the maximum) for the active pooled outputs and empty
    /// windows for the others (returns how many), and the same gradients to rounding,
    /// with and without the input gradient, with the weight gradient at 8 and 16 lanes (patch
    /// rows, and neighbourhoods where the convolution has one input channel), the same bits at
    /// both. The input is blank (zeros) around a random block, along every seventh pixel and
    /// inside a band of rows, as digits are, so empty windows, inactive pooled outputs and
    /// empty ones counted active occur; a negative bias on some channels makes pooled zeros.
    fn check_against_unfused(conv: &Conv, pool: &MaxPool, batch: usize) -> usize {
        let (h, w) = (conv.win.h.input, conv.win.w.input);
        let blank = |i: usize| {
            let (y, x) = (i / conv.in_c / w % h, i / conv.in_c % w);
            // A band of rows with only the block's two edges: windows between them meet no
            // live pixel, though their rows' live spans cover them.
            let band = (h / 5..h / 5 + 5).contains(&y) && (w / 4 + 2..w - w / 5 - 2).contains(&x);
            !(h / 5..h - h / 4).contains(&y) || !(w / 4..w - w / 5).contains(&x) || i.is_multiple_of(7) || band
        };
        let x: Vec<f32> = random_vec(batch * conv.in_len(), 1).iter().enumerate().map(|(i, &v)| if blank(i) { 0.0 } else { v }).collect();
        let weight = random_vec(conv.weight_len(), 2);
        let bias: Vec<f32> = random_vec(conv.out_c, 3).iter().map(|b| b * 0.5).collect();
        let d_pooled = random_vec(batch * pool.out_len(), 4);
        let what = format!("{conv:?} {pool:?}");

        let mut y = vec![0.0; batch * conv.out_len()];
        direct_forward(conv, batch, &x, &weight, &bias, &mut y);
        let (mut want_pooled, mut want_argmax) = (vec![0.0; batch * pool.out_len()], vec![0u8; batch * pool.out_len()]);
        max_pool_forward(pool, batch, &y, &mut want_pooled, Some(&mut want_argmax));
        // Training's outputs on cache lines (as a workspace keeps them: rows streamed as whole
        // lines), inference's one float past (the lines at the rows' ends stored as usual).
        // Bytes the forward leaves (the inactive windows' argmax) hold a tap no window has.
        let (mut pooled, mut argmax) = (AlignedBuf::zeroed(want_pooled.len()), AlignedBuf::zeroed(want_argmax.len()));
        pooled.fill(f32::NAN);
        argmax.fill(MAX_KERNEL as u8 * MAX_KERNEL as u8);
        let (narrow, wide) = (ConvPool::<8>::new(conv, pool), ConvPool::<16>::new(conv, pool));
        let mut active = vec![u64::MAX; batch * narrow.active_words()];
        narrow.forward(batch, &x, &weight, &bias, &mut pooled, Some(Kept { argmax: &mut argmax, active: &mut active }));
        assert_eq!(&pooled[..], &want_pooled[..], "{what}: pooled");
        // The active pooled outputs' argmax as the layers', where the ReLU did not zero the
        // maximum; the inactive ones' windows hold no live pixel: relu?(bias) at every tap, so
        // the layers' argmax is the first tap.
        let (c, empty, first) = (conv.out_c, narrow.empty_value(&bias), narrow.first_taps());
        let mut inactive = 0;
        for (i, ((&a, &want), &v)) in argmax.iter().zip(&want_argmax).zip(&want_pooled).enumerate() {
            let (n, q) = (i / pool.out_len(), i % pool.out_len() / c);
            if active[n * narrow.active_words() + q / 64] >> (q % 64) & 1 == 1 {
                assert_eq!(a, if conv.relu && v <= 0.0 { NOWHERE } else { want }, "{what}: argmax");
            } else {
                assert_eq!((v, want), (empty[i % c], first[q]), "{what}: an inactive pooled output, sample {n}, {q}");
                inactive += 1;
            }
        }
        let mut inference = AlignedBuf::zeroed(want_pooled.len() + 1);
        inference.fill(f32::NAN);
        wide.forward(batch, &x, &weight, &bias, &mut inference[1..], None);
        assert_eq!(&inference[1..], &want_pooled[..], "{what}: pooled without the argmax");

        let mut d_y = vec![0.0; y.len()];
        max_pool_backward(pool, batch, &d_pooled, &want_argmax, &mut d_y);
        let (mut want_db, mut want_dw, mut want_dx) = (vec![0.0; conv.out_c], vec![0.0; weight.len()], vec![0.0; x.len()]);
        relu_bias_backward(conv, batch, &y, &mut d_y, &mut want_db);
        im2col_backward(conv, batch, &x, &weight, &d_y, Some(&mut want_dx), Some(&mut want_dw));
        let close = |name: &str, got: &[f32], want: &[f32]| {
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * scale, "{what}: {name}[{i}] {g} vs {w} (largest {scale})");
            }
        };
        let mut weight_grads: Vec<Vec<u32>> = Vec::new();
        for (with_dx, lanes) in [(true, 8), (false, 8), (true, 16), (false, 16)] {
            let (mut db, mut dw, mut dx) = (vec![f32::NAN; conv.out_c], vec![f32::NAN; weight.len()], vec![f32::NAN; x.len()]);
            let args = (with_dx.then_some(&mut dx[..]), Some(&mut dw[..]), &mut db[..]);
            match lanes {
                8 => narrow.backward(batch, &x, &weight, &bias, &d_pooled, &argmax, &active, args.0, args.1, args.2),
                _ => wide.backward(batch, &x, &weight, &bias, &d_pooled, &argmax, &active, args.0, args.1, args.2),
            }
            close("bias gradient", &db, &want_db);
            close("weight gradient", &dw, &want_dw);
            weight_grads.push(dw.iter().map(|v| v.to_bits()).collect());
            if with_dx {
                close("input gradient", &dx, &want_dx);
            }
        }
        // Patch rows at either width and (one input channel, 16 lanes) neighbourhoods sum in
        // the same order.
        assert!(weight_grads.iter().all(|g| *g == weight_grads[0]), "{what}: the weight gradient's bits differ between widths");
        inactive
    }

    /// A bitmask of pooled outputs over several words gives back the list it was made from,
    /// and the words of another list are cleared first.
    #[test]
    fn active_windows_go_through_the_bitmask_unchanged() {
        let list = [0, 5, 63, 64, 65, 130, 191, 195];
        let mut bits = [u64::MAX; 4];
        mark_active(&list, &mut bits);
        let mut back = vec![7];
        active_list(&bits, &mut back);
        assert_eq!(back, list);
        mark_active(&[], &mut bits);
        active_list(&bits, &mut back);
        assert!(back.is_empty());
    }

    /// Small shapes of every geometry the pair can take: one input channel (the seed model's
    /// conv1, and others for neighbourhoods), stride, groups, channel counts that are not multiples of the lanes, patches
    /// longer than a vector, VALID and SAME pools with and without ReLU.
    #[test]
    fn fused_pair_matches_the_layers_unfused_on_small_shapes() {
        let conv = |h, w, k, s, p, in_c, out_c, groups, relu| Conv { win: Window::new(h, w, k, s, p).unwrap(), in_c, out_c, groups, relu };
        let pool = |c: &Conv, k, s, p| MaxPool { win: Window::new(c.win.h.output, c.win.w.output, k, s, p).unwrap(), channels: c.out_c };
        let mut inactive = 0;
        for (c, (k, s, p), batch) in [
            (conv(28, 28, 3, 1, Padding::Same, 1, 64, 1, true), (3, 2, Padding::Same), 3),
            (conv(14, 13, 3, 1, Padding::Same, 1, 5, 1, true), (3, 2, Padding::Same), 2),
            (conv(11, 12, 3, 1, Padding::Same, 3, 24, 1, false), (3, 2, Padding::Valid), 2),
            (conv(15, 15, 5, 2, Padding::Same, 4, 16, 2, true), (2, 2, Padding::Valid), 3),
            (conv(9, 10, 3, 1, Padding::Explicit(1), 8, 9, 1, true), (3, 1, Padding::Same), 2),
            // One input channel (neighbourhoods): a pool that pads before the
            // first pixel, and a convolution of stride 2.
            (conv(9, 9, 3, 1, Padding::Same, 1, 20, 1, true), (3, 1, Padding::Same), 2),
            (conv(13, 12, 3, 2, Padding::Same, 1, 24, 1, false), (2, 2, Padding::Valid), 3),
        ] {
            let pool = pool(&c, k, s, p);
            inactive += check_against_unfused(&c, &pool, batch);
        }
        assert!(inactive > 0, "the inputs leave some pooled outputs inactive");
    }

    /// Every convolution that a max-pool follows in every model (the pairs that fuse when the
    /// convolution runs direct loops), at batch 2.
    #[test]
    #[cfg_attr(debug_assertions, ignore = "release only: the full-size layers take minutes unoptimised")]
    fn fused_pair_matches_the_layers_unfused_on_every_model_pair() {
        let (mut pairs, mut inactive) = (0, 0);
        for name in MODEL_NAMES {
            let model = Model::new(&architecture(name, None).unwrap()).unwrap();
            for (layer, next) in model.layers.iter().zip(&model.layers[1..]) {
                if let (Some(conv), Some(pool)) = (layer.conv(), next.op.downcast::<MaxPool>()) {
                    inactive += check_against_unfused(conv, pool, 2);
                    pairs += 1;
                }
            }
        }
        assert!(pairs >= 3 && inactive > 0, "the seed model's three pairs at least ({pairs}), some pooled outputs inactive ({inactive})");
    }
}
