//! Winograd convolution (Lavin & Gray, 2016) for the stride-1 layers with 3x3 kernels, as
//! F(7x7, 3x3) on 9x9 input tiles, and with 5x5 kernels (AlexNet's conv2), as F(4x4, 5x5) on
//! 8x8 input tiles, with any padding; and for strided layers of one group whose space-to-depth
//! rewrite (`SpaceToDepth`) is one of those (AlexNet's conv1: 11x11 stride 4 -> 3x3 on 4x4
//! blocks).
//!
//! Each variant interpolates at fixed points (9x9: 1, -1, 2, -2, 1/3, -1/3, 3/4, -3/4 and
//! infinity; 8x8: 0, 1, -1, 1/2, -1/2, 2, -2 and infinity): the input transform `B` depends
//! only on the points, the output transform `A` and the kernel transform `G` also on the tile
//! sizes (`Tile`). Each MxM output tile is `A^T [ (G g G^T) . (B^T d B) ] A` for the input tile
//! `d`: per tile and channel pair, 81 multiplications instead of 441 (3x3: 49 outputs x 9
//! taps), or 64 instead of 400 (5x5: 16 outputs x 25 taps). The elementwise products summed
//! over input channels become one GEMM per transformed point, `M[xi] = V[xi] U[xi]` with
//! `V[xi]` of shape tiles x in_c and `U[xi]` in_c x out_c, so the work stays in the `gemm`
//! crate (for grouped layers, like the two-tower AlexNet's, one GEMM per group on its blocks of
//! V, U and M). On the seed model's 14x14 and 7x7 layers (which 7x7 tiles cover exactly) that
//! is 5.4x fewer flops than im2col, on AlexNet's 13x13 conv3-conv5 (14x14) 4.7x, on its 27x27
//! conv2 (28x28) 5.8x, on its conv1 (55x55 outputs, 56x56 in tiles, after the rewrite's 81/121
//! more taps) 4.4x, in all three passes:
//!
//! - forward: `Y = A^T (V U) A`;
//! - weight gradient: `dU[xi] = V[xi]^T dM[xi]` with `dM = A dY A^T`, then `dW = G^T dU G`;
//! - input gradient: `dV[xi] = dM[xi] U[xi]^T`, then `dX += B dV B^T` scattered over the
//!   overlapping input tiles.
//!
//! (For the 5x5 kernel F(4x4, 5x5) replaced F(2x2, 5x5), whose 6x6 tiles took 36
//! multiplications per 4 outputs: 2.25x the GEMM flops of the 8x8 tiles. The 8x8 tiles' points
//! round no worse here: AlexNet's conv2 at batch 5 is within 1.1e-5 of the largest value in all
//! three passes, as it was with 6x6 tiles. For the 3x3 kernel F(7x7, 3x3) replaced F(4x4,
//! 3x3) on 6x6 tiles, 36 multiplications per 16 outputs: 1.8x the GEMM flops of the 9x9 tiles
//! on the seed model's layers, which 4x4 tiles cover as 16x16 and 8x8. Inside the training step
//! on a Zen 4 EPYC, 6 alternating pairs each, the seed model's conv2 forward and backward took
//! 0.75x and 0.68x the time, conv3 0.88x and 0.83x (16 lanes; 8 lanes 0.82x, 0.72x, 1.01x,
//! 0.96x), and its inference 0.83x. `F7x3` says what that costs in rounding.)
//!
//! Transforms work on vectors of channels (NHWC keeps channels contiguous), written once for
//! any width: the target's full width `simd::L` (16 lanes with AVX-512) where both channel
//! counts are multiples of it, else 8 lanes, hence the multiple-of-8 requirement in `applies`.

use super::conv::Conv;
use super::gemm::{Operand, matmul};
use super::sample_ranges;
use super::scratch::{SCRATCH_A, SCRATCH_B, SCRATCH_C, give_back, take, take_zeroed, with_scratch};
use super::simd::{L, Lanes, MIN_L, load, store};
use super::space_to_depth::SpaceToDepth;
use super::{split_by_ranges, sum_partials};
use rayon::prelude::*;

/// Tiles per chunk in backward: the rows of the input gradient's GEMMs (which pack U again for
/// each chunk) and, where threads sum the weight gradient over their own samples, one
/// accumulation into all of their dU (A * A x in_c x out_c) per chunk: so chunks are long.
const BACKWARD_TILES: usize = 256;
/// Bytes of V and M per chunk in forward, which reads each once: small enough to stay in cache
/// between the transforms and the GEMMs. On a Zen 4 core (1 MB L2) 1.5-3 MB run the seed model's
/// conv2 and conv3 forward 10-15% faster than the 7-14 MB of 256-tile chunks.
const FORWARD_CHUNK_BYTES: usize = 2 << 20;
/// But a chunk has at least this many tiles: they are the rows of its GEMMs, and below that
/// the `gemm` crate runs its narrow edge kernels and packs U (in_c x out_c per point) again for
/// few rows. AlexNet's conv3-conv5 at batch 16 ran 1.5x slower in 16-tile chunks than in 64-tile
/// ones, and 128 beat 64 by 4% (Zen 4); its conv2 (8x8 tiles, 90 KB each) forward takes 13.5 ms
/// in 128-tile chunks against 16.6 in the 23 tiles of 2 MB (Xeon, Emerald Rapids).
const MIN_FORWARD_TILES: usize = 128;

/// How far Winograd's results may lie from the exact ones, relative to the largest value of the
/// tensor: the tests' bound (F(7x7, 3x3), whose 9x9 maps sum the most terms, rounds to within
/// 5e-5 of it; F(4x4, 5x5) to within 1.1e-5).
pub const ROUNDING: f32 = 1e-4;

/// Whether `conv` can take the Winograd path (else it goes through im2col).
pub fn applies(conv: &Conv) -> bool {
    let c = stride_one(conv);
    (c.win.kernel == 3 || c.win.kernel == 5) && c.win.stride == 1 && c.in_c.is_multiple_of(MIN_L) && c.out_c.is_multiple_of(MIN_L)
}

/// The stride-1 layer the transforms work on: `conv` itself, or its space-to-depth rewrite.
fn stride_one(conv: &Conv) -> Conv {
    SpaceToDepth::of(conv).map_or(*conv, |s2d| s2d.inner)
}

/// Run `$f::<lanes, A, M, R, variant>` for the layer's kernel size, at the widest width both
/// channel counts allow: the one table of which variant, and so which tile sides, each kernel
/// size gets.
macro_rules! dispatch {
    ($conv:expr, $f:ident($($arg:expr),*)) => {
        match ($conv.win.kernel, $conv.in_c.is_multiple_of(L) && $conv.out_c.is_multiple_of(L)) {
            (3, true) => $f::<L, 9, 7, 3, F7x3>($($arg),*),
            (3, false) => $f::<MIN_L, 9, 7, 3, F7x3>($($arg),*),
            (5, true) => $f::<L, 8, 4, 5, F4x5>($($arg),*),
            (5, false) => $f::<MIN_L, 8, 4, 5, F4x5>($($arg),*),
            (k, _) => unreachable!("Winograd for a {k}x{k} kernel: `applies` admits 3x3 and 5x5 only"),
        }
    };
}

/// What a forward pass does with the transformed weights U (and inputs V).
pub enum Transforms<'a> {
    /// Makes U in a scratch buffer for this pass only.
    Discard,
    /// A training pass: U, then V of every tile, kept here (`saved_len` floats) for `backward`.
    Keep(&'a mut [f32]),
    /// An evaluation workspace's U (`u_len` floats), kept across passes with the weights it was
    /// made from (`of`) and remade only when their bits differ: making U writes 6-21 MB per
    /// layer for AlexNet's conv2-conv5 (a thirteenth of an inference pass); comparing only
    /// reads the weights and their copy, 2 x 9/36 (3x3) or 2 x 25/64 (5x5) as many floats.
    Cache { of: &'a mut Vec<f32>, u: &'a mut [f32] },
}

/// Forward over a batch: `output = relu?(conv(input) + bias)`.
pub fn forward(conv: &Conv, n: usize, input: &[f32], weight: &[f32], bias: &[f32], output: &mut [f32], transforms: Transforms) {
    let Some(s2d) = SpaceToDepth::of(conv) else { return dispatch!(conv, forward_at(conv, n, input, weight, bias, output, transforms)) };
    let (x, w) = (blocks_of_input(&s2d, n, input), blocks_of_weights(&s2d, weight));
    dispatch!(s2d.inner, forward_at(&s2d.inner, n, &x, &w, bias, output, transforms));
    give_back(x);
    give_back(w);
}

/// A strided layer's input as its rewrite's (in a pooled buffer).
fn blocks_of_input(s2d: &SpaceToDepth, n: usize, input: &[f32]) -> Vec<f32> {
    let mut x = take(n * s2d.inner.in_len());
    s2d.input(n, input, &mut x);
    x
}

/// A strided layer's weights as its rewrite's (in a pooled buffer).
fn blocks_of_weights(s2d: &SpaceToDepth, weight: &[f32]) -> Vec<f32> {
    let mut w = take(s2d.inner.weight_len());
    s2d.weights(weight, &mut w);
    w
}

/// Whether two float slices hold the same bits (unlike `==`, which takes -0 for 0 and no NaN
/// for itself), compared in blocks that vectorise.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.chunks(256).zip(b.chunks(256)).all(|(a, b)| a.iter().zip(b).fold(0, |d, (x, y)| d | (x.to_bits() ^ y.to_bits())) == 0)
}

/// What backward needs when the forward pass was not Winograd: U (for the input gradient) and
/// V of every tile of the batch (for the weight gradient), into `saved` as forward lays them out.
pub fn prepare_backward(conv: &Conv, n: usize, input: &[f32], weight: &[f32], saved: &mut [f32], want_u: bool, want_v: bool) {
    let Some(s2d) = SpaceToDepth::of(conv) else {
        return dispatch!(conv, prepare_backward_at(conv, n, input, weight, saved, want_u, want_v));
    };
    let x = if want_v { blocks_of_input(&s2d, n, input) } else { Vec::new() };
    let w = if want_u { blocks_of_weights(&s2d, weight) } else { Vec::new() };
    dispatch!(s2d.inner, prepare_backward_at(&s2d.inner, n, &x, &w, saved, want_u, want_v));
    give_back(x);
    give_back(w);
}

/// The ReLU's mask and the bias gradient taken where `backward` transforms the output gradient
/// (which it then reads unmasked) instead of in a pass of their own over the batch
/// (`relu_bias_backward`, which reads the output and its gradient and writes the gradient back:
/// 37 MB a batch of 16 for the paper's conv1).
pub struct MaskAndBias<'a> {
    /// The layer's output, whose zeros mask the gradient: `None` for a layer without a ReLU.
    pub output: Option<&'a [f32]>,
    /// Overwritten with the bias gradient: each thread's sum over its tiles, in order, then the
    /// threads' sums in order (reproducible for a thread count).
    pub d_bias: &'a mut [f32],
}

/// Input and/or weight gradient (whichever is given; both overwritten) from what
/// `forward` (or `prepare_backward`) saved and `d_output`: ReLU-masked already, or masked here
/// with the bias gradient made on the way (`mask_and_bias`).
pub fn backward(
    conv: &Conv,
    n: usize,
    saved: &[f32],
    d_output: &[f32],
    mask_and_bias: Option<MaskAndBias>,
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
) {
    let Some(s2d) = SpaceToDepth::of(conv) else {
        return dispatch!(conv, backward_at(conv, n, saved, d_output, mask_and_bias, d_input, d_weight));
    };
    let inner = &s2d.inner;
    let mut dx = d_input.as_ref().map(|_| take(n * inner.in_len()));
    let mut dw = d_weight.as_ref().map(|_| take(inner.weight_len()));
    dispatch!(inner, backward_at(inner, n, saved, d_output, mask_and_bias, dx.as_deref_mut(), dw.as_deref_mut()));
    if let (Some(d_input), Some(dx)) = (d_input, dx) {
        s2d.input_grad(n, &dx, d_input);
        give_back(dx);
    }
    if let (Some(d_weight), Some(dw)) = (d_weight, dw) {
        s2d.weight_grad(&dw, d_weight);
        give_back(dw);
    }
}

/// Input and output tile sides (A, M) of the layer's variant, read off `dispatch`.
fn tile_sides(conv: &Conv) -> (usize, usize) {
    fn sides<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>() -> (usize, usize) {
        (A, M)
    }
    dispatch!(conv, sides())
}

/// Side of an output tile.
fn tile_side(conv: &Conv) -> usize {
    tile_sides(conv).1
}

/// Transformed points per tile: A * A.
fn points(conv: &Conv) -> usize {
    tile_sides(conv).0.pow(2)
}

fn tiles(conv: &Conv) -> (usize, usize) {
    let m = tile_side(conv);
    (conv.win.h.output.div_ceil(m), conv.win.w.output.div_ceil(m))
}

fn tiles_per_sample(conv: &Conv) -> usize {
    let (th, tw) = tiles(conv);
    th * tw
}

pub fn u_len(conv: &Conv) -> usize {
    let conv = &stride_one(conv);
    points(conv) * (conv.in_c / conv.groups) * conv.out_c
}

/// Floats a training forward pass keeps for backward: U, then V of every tile of the batch.
pub fn saved_len(conv: &Conv, batch: usize) -> usize {
    let conv = &stride_one(conv);
    u_len(conv) + points(conv) * batch * tiles_per_sample(conv) * conv.in_c
}

/// A variant F(MxM, RxR) on AxA input tiles (A = M + R - 1): the input transform `B^T` (A -> A)
/// and its transpose (for the input gradient), the output transform `A^T` (A -> M) and its
/// transpose (for the output gradient), the kernel transform `G` (R -> A) and its transpose
/// (for the weight gradient). Row i of `A^T` holds the points' i-th powers (infinity's column
/// only in the last row); row p of `G` is p's powers 0..R-1 over the product of p's distances
/// to the other finite points (infinity's row picks the last tap); `B^T` is what makes
/// `A^T [(G g) . (B^T d)]` the correlation of g and d (`maps_compute_the_correlation` checks
/// each variant's maps, and that the transposes are transposes).
trait Tile<const A: usize, const M: usize, const R: usize> {
    fn bt<const N: usize>(d: [Lanes<N>; A]) -> [Lanes<N>; A];
    fn b<const N: usize>(v: [Lanes<N>; A]) -> [Lanes<N>; A];
    fn at<const N: usize>(m: [Lanes<N>; A]) -> [Lanes<N>; M];
    fn a<const N: usize>(y: [Lanes<N>; M]) -> [Lanes<N>; A];
    fn g<const N: usize>(k: [Lanes<N>; R]) -> [Lanes<N>; A];
    fn gt<const N: usize>(u: [Lanes<N>; A]) -> [Lanes<N>; R];
}

/// F(4x4, 5x5): the 5x5 layers.
struct F4x5;

// Points in the order 0, 1, -1, 1/2, -1/2, 2, -2, infinity; `B^T`'s and `G`'s first rows
// negated (as NNPACK's 8x8 transforms have them), which cancels.
impl Tile<8, 4, 5> for F4x5 {
    #[inline(always)]
    fn bt<const N: usize>([d0, d1, d2, d3, d4, d5, d6, d7]: [Lanes<N>; 8]) -> [Lanes<N>; 8] {
        let (s1, t1) = (d2 + d6 - 4.25 * d4, d1 + d5 - 4.25 * d3);
        let (s2, t2) = (4.0 * d2 - 5.0 * d4 + d6, 2.0 * d1 - 2.5 * d3 + 0.5 * d5);
        let (s3, t3) = (0.25 * d2 - 1.25 * d4 + d6, 0.5 * d1 - 2.5 * d3 + 2.0 * d5);
        [d0 - d6 + 5.25 * (d4 - d2), s1 + t1, s1 - t1, s2 + t2, s2 - t2, s3 + t3, s3 - t3, d7 - d1 + 5.25 * (d3 - d5)]
    }
    #[inline(always)]
    fn b<const N: usize>([v0, v1, v2, v3, v4, v5, v6, v7]: [Lanes<N>; 8]) -> [Lanes<N>; 8] {
        let (p12, m12, p34, m34, p56, m56) = (v1 + v2, v1 - v2, v3 + v4, v3 - v4, v5 + v6, v5 - v6);
        [
            v0,
            m12 + 2.0 * m34 + 0.5 * m56 - v7,
            p12 + 4.0 * p34 + 0.25 * p56 - 5.25 * v0,
            5.25 * v7 - 4.25 * m12 - 2.5 * (m34 + m56),
            5.25 * v0 - 4.25 * p12 - 5.0 * p34 - 1.25 * p56,
            m12 + 0.5 * m34 + 2.0 * m56 - 5.25 * v7,
            p12 + p34 + p56 - v0,
            v7,
        ]
    }
    #[inline(always)]
    fn at<const N: usize>([m0, m1, m2, m3, m4, m5, m6, m7]: [Lanes<N>; 8]) -> [Lanes<N>; 4] {
        let (p12, m12, p34, m34, p56, m56) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4, m5 + m6, m5 - m6);
        [m0 + p12 + p34 + p56, m12 + 0.5 * m34 + 2.0 * m56, p12 + 0.25 * p34 + 4.0 * p56, m12 + 0.125 * m34 + 8.0 * m56 + m7]
    }
    #[inline(always)]
    fn a<const N: usize>([y0, y1, y2, y3]: [Lanes<N>; 4]) -> [Lanes<N>; 8] {
        let (e1, o1) = (y0 + y2, y1 + y3);
        let (e2, o2) = (y0 + 0.25 * y2, 0.5 * y1 + 0.125 * y3);
        let (e3, o3) = (y0 + 4.0 * y2, 2.0 * y1 + 8.0 * y3);
        [y0, e1 + o1, e1 - o1, e2 + o2, e2 - o2, e3 + o3, e3 - o3, y3]
    }
    #[inline(always)]
    fn g<const N: usize>([k0, k1, k2, k3, k4]: [Lanes<N>; 5]) -> [Lanes<N>; 8] {
        let (even, odd) = (k0 + k2 + k4, k1 + k3);
        let (e2, o2) = ((32.0 / 45.0) * k0 + (8.0 / 45.0) * k2 + (2.0 / 45.0) * k4, (16.0 / 45.0) * k1 + (4.0 / 45.0) * k3);
        let (e3, o3) = ((1.0 / 90.0) * k0 + (2.0 / 45.0) * k2 + (8.0 / 45.0) * k4, (1.0 / 45.0) * k1 + (4.0 / 45.0) * k3);
        [k0, (-2.0 / 9.0) * (even + odd), (-2.0 / 9.0) * (even - odd), e2 + o2, e2 - o2, e3 + o3, e3 - o3, k4]
    }
    #[inline(always)]
    fn gt<const N: usize>([u0, u1, u2, u3, u4, u5, u6, u7]: [Lanes<N>; 8]) -> [Lanes<N>; 5] {
        let (p12, m12, p34, m34, p56, m56) = (u1 + u2, u1 - u2, u3 + u4, u3 - u4, u5 + u6, u5 - u6);
        let (e, o) = ((-2.0 / 9.0) * p12, (-2.0 / 9.0) * m12);
        [
            u0 + e + (32.0 / 45.0) * p34 + (1.0 / 90.0) * p56,
            o + (16.0 / 45.0) * m34 + (1.0 / 45.0) * m56,
            e + (8.0 / 45.0) * p34 + (2.0 / 45.0) * p56,
            o + (4.0 / 45.0) * m34 + (4.0 / 45.0) * m56,
            e + (2.0 / 45.0) * p34 + (8.0 / 45.0) * p56 + u7,
        ]
    }
}

/// F(7x7, 3x3) on 9x9 input tiles: 81 multiplications per 49 outputs where F(4x4, 3x3) takes 36 per
/// 16, so 0.73x the GEMM flops per output, and it tiles the seed model's 14x14 and 7x7 layers and
/// AlexNet's 13x13 ones with less padding (0.56x the GEMM flops on each). Its points are symmetric
/// pairs and infinity, with no 0: +-1, +-2, +-1/3, +-3/4, the set of four pairs from {1, 2, 3, 4,
/// 1/2, 1/3, 1/4, 3/2, 2/3, 3/4, 4/3} that rounds least in f32 (a search over random ReLU'd
/// 64-channel tiles: 2.8e-5 of the largest output in forward, 3.6e-5 in the input gradient, against
/// 5e-6 and 3e-6 for F(4x4, 3x3); the best sets with 0 in them rounded 2x worse; on the tests'
/// uniform values, up to 5.0e-5, the input gradient of 7x7x128 by 3x3). With pairs, each map works
/// on sums and differences of a pair's two values (even and odd powers), about 0.7x the
/// multiply-adds of the dense 9x9 matrices.
struct F7x3;

/// The positive points of `F7x3`'s pairs.
const F7_PAIRS: [f64; 4] = [1.0, 2.0, 1.0 / 3.0, 0.75];

/// What the maps of a variant whose finite points are four pairs +-p_k multiply by, worked out
/// from the points at compile time; the transformed points go +p_1, -p_1, .., +p_4, -p_4,
/// infinity. With `Q_k(x) = prod over j != k of (x^2 - p_j^2) = sum_i q[k][i] x^2i` and
/// `M(x) = prod over j of (x^2 - p_j^2) = sum_i mu[i] x^2i`: row +-p_k of `B^T` holds the
/// coefficients of `(x +- p_k) Q_k(x)` (x less each other finite point, multiplied out), so
/// its odd powers' are q[k] and its even powers' +-p_k q[k]; infinity's row holds M's; column
/// +-p_k of `A^T` holds the powers of +-p_k; row +-p_k of `G` is (1, +-p_k, p_k^2) over
/// +-p_k's distances to the other finite points multiplied, +-2 p_k Q_k(p_k).
struct PairedPoints {
    /// q[k][i]: the coefficient of x^2i in Q_k.
    q: [[f32; 4]; 4],
    /// p_k q[k][i].
    pq: [[f32; 4]; 4],
    /// The coefficients of M's even powers.
    mu: [f32; 5],
    /// p_k^i for the output tile's rows.
    pow: [[f32; 7]; 4],
    /// 1 / (2 p_k Q_k(p_k)): `G`'s row +p_k is (1, p_k, p_k^2) times it, row -p_k
    /// (1, -p_k, p_k^2) times its negative.
    c: [f32; 4],
}

/// `PairedPoints` for the pairs +-p[k]: the polynomials multiplied out in f64, each coefficient
/// rounded to f32 once.
const fn paired_points(p: [f64; 4]) -> PairedPoints {
    let (mut q, mut pq, mut mu, mut pow, mut c) = ([[0.0; 4]; 4], [[0.0; 4]; 4], [0.0; 5], [[0.0; 7]; 4], [0.0; 4]);
    // M(z) = prod (z - p_j^2) in z = x^2, and each Q_k likewise, by multiplying out.
    let mut m = [1.0f64, 0.0, 0.0, 0.0, 0.0];
    let mut j = 0;
    while j < 4 {
        times_root(&mut m, p[j] * p[j]);
        j += 1;
    }
    let mut i = 0;
    while i < 5 {
        mu[i] = m[i] as f32;
        i += 1;
    }
    let mut k = 0;
    while k < 4 {
        let mut qk = [1.0f64, 0.0, 0.0, 0.0];
        let mut j = 0;
        while j < 4 {
            if j != k {
                times_root(&mut qk, p[j] * p[j]);
            }
            j += 1;
        }
        let (mut at_p, mut z) = (0.0, 1.0);
        let mut i = 0;
        while i < 4 {
            q[k][i] = qk[i] as f32;
            pq[k][i] = (p[k] * qk[i]) as f32;
            at_p += qk[i] * z;
            z *= p[k] * p[k];
            i += 1;
        }
        c[k] = (1.0 / (2.0 * p[k] * at_p)) as f32;
        let mut power = 1.0;
        let mut i = 0;
        while i < 7 {
            pow[k][i] = power as f32;
            power *= p[k];
            i += 1;
        }
        k += 1;
    }
    PairedPoints { q, pq, mu, pow, c }
}

/// `poly` (coefficients from the constant term up) times `(z - root)`, in place: `poly` must
/// have room for the product's top coefficient.
const fn times_root<const D: usize>(poly: &mut [f64; D], root: f64) {
    let mut i = D - 1;
    while i > 0 {
        poly[i] = poly[i - 1] - root * poly[i];
        i -= 1;
    }
    poly[0] *= -root;
}

/// `F7x3`'s coefficients.
const F7: PairedPoints = paired_points(F7_PAIRS);

/// Each pair's two values (+p_k's and -p_k's) added and subtracted: what `F7x3`'s maps from
/// transformed points work on.
#[inline(always)]
fn pair_sums<const N: usize>(v: &[Lanes<N>; 9]) -> ([Lanes<N>; 4], [Lanes<N>; 4]) {
    (array_of(|k| v[2 * k] + v[2 * k + 1]), array_of(|k| v[2 * k] - v[2 * k + 1]))
}

impl Tile<9, 7, 3> for F7x3 {
    #[inline(always)]
    fn bt<const N: usize>(d: [Lanes<N>; 9]) -> [Lanes<N>; 9] {
        // Row +-p_k: O_k +- E_k, O_k the odd-position inputs by q[k], E_k the even ones by p_k q[k].
        let mut out = [Lanes::default(); 9];
        for k in 0..4 {
            let (mut odd, mut even) = (F7.q[k][0] * d[1], F7.pq[k][0] * d[0]);
            for i in 1..4 {
                odd = odd.mul_add(F7.q[k][i], d[2 * i + 1]);
                even = even.mul_add(F7.pq[k][i], d[2 * i]);
            }
            (out[2 * k], out[2 * k + 1]) = (odd + even, odd - even);
        }
        let mut inf = d[8];
        for i in 0..4 {
            inf = inf.mul_add(F7.mu[i], d[2 * i]);
        }
        out[8] = inf;
        out
    }
    #[inline(always)]
    fn b<const N: usize>(v: [Lanes<N>; 9]) -> [Lanes<N>; 9] {
        let (sum, diff) = pair_sums(&v);
        let mut out = [Lanes::default(); 9];
        for i in 0..4 {
            let (mut odd, mut even) = (F7.q[0][i] * sum[0], F7.mu[i] * v[8]);
            for k in 0..4 {
                if k > 0 {
                    odd = odd.mul_add(F7.q[k][i], sum[k]);
                }
                even = even.mul_add(F7.pq[k][i], diff[k]);
            }
            (out[2 * i], out[2 * i + 1]) = (even, odd);
        }
        out[8] = v[8];
        out
    }
    #[inline(always)]
    fn at<const N: usize>(m: [Lanes<N>; 9]) -> [Lanes<N>; 7] {
        let (sum, diff) = pair_sums(&m);
        array_of(|i| {
            let s = if i % 2 == 0 { &sum } else { &diff };
            let mut y = F7.pow[0][i] * s[0];
            for (k, &s) in s.iter().enumerate().skip(1) {
                y = y.mul_add(F7.pow[k][i], s);
            }
            // Infinity reaches the last row only.
            if i == 6 { y + m[8] } else { y }
        })
    }
    #[inline(always)]
    fn a<const N: usize>(y: [Lanes<N>; 7]) -> [Lanes<N>; 9] {
        let mut out = [Lanes::default(); 9];
        for k in 0..4 {
            let (mut even, mut odd) = (y[0], F7.pow[k][1] * y[1]);
            for (i, &y) in y.iter().enumerate().skip(2) {
                if i % 2 == 0 {
                    even = even.mul_add(F7.pow[k][i], y);
                } else {
                    odd = odd.mul_add(F7.pow[k][i], y);
                }
            }
            (out[2 * k], out[2 * k + 1]) = (even + odd, even - odd);
        }
        out[8] = y[6];
        out
    }
    #[inline(always)]
    fn g<const N: usize>([g0, g1, g2]: [Lanes<N>; 3]) -> [Lanes<N>; 9] {
        let mut out = [Lanes::default(); 9];
        for k in 0..4 {
            let p = F7_PAIRS[k] as f32;
            let (even, odd) = (F7.c[k] * g0.mul_add(p * p, g2), (F7.c[k] * p) * g1);
            (out[2 * k], out[2 * k + 1]) = (even + odd, odd - even);
        }
        out[8] = g2;
        out
    }
    #[inline(always)]
    fn gt<const N: usize>(u: [Lanes<N>; 9]) -> [Lanes<N>; 3] {
        let (sum, diff) = pair_sums(&u);
        let (mut t0, mut t1, mut t2) = (F7.c[0] * diff[0], (F7.c[0] * F7_PAIRS[0] as f32) * sum[0], u[8]);
        for k in 0..4 {
            let p = F7_PAIRS[k] as f32;
            if k > 0 {
                t0 = t0.mul_add(F7.c[k], diff[k]);
                t1 = t1.mul_add(F7.c[k] * p, sum[k]);
            }
            t2 = t2.mul_add(F7.c[k] * p * p, diff[k]);
        }
        [t0, t1, t2]
    }
}

/// `$f` applied along columns, then along rows: `F x F^T` for the matrix F of `$f` (a variant's
/// map, from `$s` values to `$t`). A macro, so that the map is called by name and inlined: passed
/// to a function as `T::bt`, each call went through the function item's `Fn::call`, which LLVM left
/// a call (the map's nine vectors through memory each way).
macro_rules! two_d {
    ($x:expr, $f:path, $s:expr => $t:expr) => {{
        let x = $x;
        let cols: [[_; $t]; $s] = array_of(|j| $f(array_of(|i| x[i][j])));
        let rows: [[_; $t]; $t] = array_of(|i| $f(array_of(|j| cols[j][i])));
        rows
    }};
}

/// The S x S tile whose element (i, j) is `at(i, j)`.
#[inline(always)]
fn tile_of<const N: usize, const S: usize>(at: impl Fn(usize, usize) -> Lanes<N>) -> [[Lanes<N>; S]; S] {
    array_of(|i| array_of(|j| at(i, j)))
}

/// `[f(0), f(1), ..]`, built without first filling the array with zeros: tiles of zeros then
/// overwritten cost a call to `memset` per tile and channel block, which LLVM did not remove
/// (5-10% of AlexNet's conv1 Winograd passes in profiles), and `array::from_fn` left its closures
/// as calls.
#[inline(always)]
fn array_of<T: Copy, const S: usize>(mut f: impl FnMut(usize) -> T) -> [T; S] {
    let mut a = [std::mem::MaybeUninit::<T>::uninit(); S];
    for (i, v) in a.iter_mut().enumerate() {
        v.write(f(i));
    }
    // SAFETY: every element was written above, and `MaybeUninit<T>` has the layout of `T`.
    unsafe { std::mem::transmute_copy(&a) }
}

/// U[xi][ci][co] = (G g G^T)[xi] for every weight's channel pair (ci counting within the
/// group, as in the HWIO weights). Point-major, so that U[xi] is one contiguous
/// (in_c / groups) x out_c matrix (column block g is group g's), which the GEMMs pack from
/// neighbouring rows. (With the points of a channel pair side by side, [ci][xi][co], its rows
/// lay 36 x out_c floats apart: the `gemm` crate's packing took 8.9% of a seed-model `bench`
/// in a profile, 7.5% with this layout.)
fn transform_weights<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
    conv: &Conv,
    weight: &[f32],
    u: &mut [f32],
) {
    let (cin_g, cout) = (conv.in_c / conv.groups, conv.out_c);
    // Each input channel's rows of every point, so that channels go in parallel.
    let mut rows: Vec<Vec<&mut [f32]>> = (0..cin_g).map(|_| Vec::with_capacity(A * A)).collect();
    for point in u[..A * A * cin_g * cout].chunks_exact_mut(cin_g * cout) {
        for (ci, row) in point.chunks_exact_mut(cout).enumerate() {
            rows[ci].push(row);
        }
    }
    rows.into_par_iter().enumerate().for_each(|(ci, mut rows)| {
        for co in (0..cout).step_by(N) {
            let gk = tile_of::<N, R>(|ky, kx| load(weight, ((ky * R + kx) * cin_g + ci) * cout + co));
            for (xi, v) in two_d!(&gk, T::g, R => A).iter().flatten().enumerate() {
                store(rows[xi], co, *v);
            }
        }
    });
}

/// Matrix U[xi] from column `col` on (a group's block), as a GEMM operand (transposed if `t`).
fn u_slab<'a>(u: &'a [f32], conv: &Conv, xi: usize, col: usize, t: bool) -> Operand<'a> {
    let (cin_g, cout) = (conv.in_c / conv.groups, conv.out_c);
    let s = &u[xi * cin_g * cout + col..];
    if t { Operand::t(s, cout) } else { Operand::new(s, cout) }
}

/// The tiles of a thread's sample range (numbered across the batch, sample by sample, row by
/// row) in chunks of `tiles` (the last shorter): a chunk may end inside a sample, so that a
/// 27x27 layer's 49 tiles per sample need not all be in flight at once.
fn tile_chunks(conv: &Conv, samples: std::ops::Range<usize>, tiles: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let tps = tiles_per_sample(conv);
    let (first, end) = (samples.start * tps, samples.end * tps);
    (first..end).step_by(tiles).map(move |t| t..(t + tiles).min(end))
}

/// Sample, tile row and tile column of tile `t` of the batch.
fn tile_position(conv: &Conv, t: usize) -> (usize, usize, usize) {
    let (tps, tw) = (tiles_per_sample(conv), tiles(conv).1);
    (t / tps, t % tps / tw, t % tw)
}

/// V[t][xi][c] for the tiles in `chunk`.
fn transform_input<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
    conv: &Conv,
    input: &[f32],
    chunk: std::ops::Range<usize>,
    v: &mut [f32],
) {
    let (pad_h, pad_w) = (conv.win.h.pad_before as isize, conv.win.w.pad_before as isize);
    let (h, w, c) = (conv.win.h.input as isize, conv.win.w.input as isize, conv.in_c);
    for (t, tile) in chunk.clone().enumerate() {
        let (n, ty, tx) = tile_position(conv, tile);
        let x = &input[n * conv.in_len()..(n + 1) * conv.in_len()];
        let vt = &mut v[t * A * A * c..(t + 1) * A * A * c];
        for ch in (0..c).step_by(N) {
            let d = tile_of::<N, A>(|i, j| {
                let (y, xx) = ((M * ty) as isize - pad_h + i as isize, (M * tx) as isize - pad_w + j as isize);
                if (0..h).contains(&y) && (0..w).contains(&xx) { load(x, ((y * w + xx) as usize) * c + ch) } else { Lanes::default() }
            });
            for (xi, val) in two_d!(&d, T::bt, A => A).iter().flatten().enumerate() {
                store(vt, xi * c + ch, *val);
            }
        }
    }
}

/// Matrix `xi` of a `[row][xi][col]` tensor of `points` per row from column `col` on (a
/// group's block), as a GEMM operand (transposed if `t`).
fn slab(data: &[f32], points: usize, cols: usize, xi: usize, col: usize, t: bool) -> Operand<'_> {
    let s = &data[xi * cols + col..];
    if t { Operand::t(s, points * cols) } else { Operand::new(s, points * cols) }
}

/// Every (transformed point, group) pair: one GEMM each.
fn point_groups(points: usize, groups: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..points).flat_map(move |xi| (0..groups).map(move |g| (xi, g)))
}

/// `forward` at `N` lanes, for variant `T`.
fn forward_at<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
    conv: &Conv,
    n: usize,
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    output: &mut [f32],
    transforms: Transforms,
) {
    let (cin, cout, groups) = (conv.in_c, conv.out_c, conv.groups);
    let (cin_g, cout_g) = (cin / groups, cout / groups);
    let (tps, xis) = (tiles_per_sample(conv), A * A);
    let mut u_own = Vec::new();
    // Where U goes, where V goes (kept for backward or not), and whether U is to be made.
    let (u, v_all, make_u) = match transforms {
        Transforms::Keep(s) => {
            let (u, v) = s.split_at_mut(u_len(conv));
            (u, Some(v), true)
        }
        Transforms::Cache { of, u } => {
            let stale = !same_bits(of, weight);
            if stale {
                of.clear();
                of.extend_from_slice(weight);
            }
            (u, None, stale)
        }
        Transforms::Discard => {
            u_own = take(u_len(conv));
            (&mut u_own[..], None, true)
        }
    };
    if make_u {
        transform_weights::<N, A, M, R, T>(conv, weight, u);
    }
    let u: &[f32] = u;
    let ranges = sample_ranges(n);
    let mut outs = split_by_ranges(&mut output[..n * conv.out_len()], &ranges, conv.out_len());
    let mut v_parts: Vec<Option<&mut [f32]>> = match v_all {
        Some(v) => split_by_ranges(&mut v[..xis * n * tps * cin], &ranges, xis * tps * cin).into_iter().map(Some).collect(),
        None => ranges.iter().map(|_| None).collect(),
    };
    let (h, w) = (conv.win.h.output, conv.win.w.output);
    let forward_tiles = (FORWARD_CHUNK_BYTES / (xis * (cin + cout) * size_of::<f32>())).max(MIN_FORWARD_TILES);
    ranges.par_iter().zip(outs.par_iter_mut()).zip(v_parts.par_iter_mut()).for_each(|((range, out), v_keep)| {
        for chunk in tile_chunks(conv, range.clone(), forward_tiles) {
            let t_count = chunk.len();
            let mut run = |v: &mut [f32]| {
                transform_input::<N, A, M, R, T>(conv, input, chunk.clone(), v);
                with_scratch(&SCRATCH_B, xis * t_count * cout, |m| {
                    for (xi, g) in point_groups(xis, groups) {
                        matmul(
                            t_count,
                            cout_g,
                            cin_g,
                            slab(v, xis, cin, xi, g * cin_g, false),
                            u_slab(u, conv, xi, g * cout_g, false),
                            &mut m[xi * cout + g * cout_g..],
                            xis * cout,
                            false,
                        );
                    }
                    // Inverse transform, bias and ReLU, clipped to the image.
                    for (t, tile) in chunk.clone().enumerate() {
                        let (nn, ty, tx) = tile_position(conv, tile);
                        let y = &mut out[(nn - range.start) * conv.out_len()..(nn - range.start + 1) * conv.out_len()];
                        let mt = &m[t * xis * cout..(t + 1) * xis * cout];
                        for co in (0..cout).step_by(N) {
                            let mm = tile_of::<N, A>(|i, j| load(mt, (i * A + j) * cout + co));
                            let o = two_d!(&mm, T::at, A => M);
                            let bv = load(bias, co);
                            for (i, row) in o.iter().enumerate().take(h - M * ty) {
                                for (j, val) in row.iter().enumerate().take(w - M * tx) {
                                    let mut s = *val + bv;
                                    if conv.relu {
                                        s.0.iter_mut().for_each(|x| *x = x.max(0.0));
                                    }
                                    store(y, ((M * ty + i) * w + M * tx + j) * cout + co, s);
                                }
                            }
                        }
                    }
                });
            };
            match v_keep {
                Some(v) => {
                    let off = xis * (chunk.start - range.start * tps) * cin;
                    run(&mut v[off..off + xis * t_count * cin]);
                }
                None => with_scratch(&SCRATCH_A, xis * t_count * cin, run),
            }
        }
    });
    give_back(u_own);
}

/// `prepare_backward` at `N` lanes.
fn prepare_backward_at<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
    conv: &Conv,
    n: usize,
    input: &[f32],
    weight: &[f32],
    saved: &mut [f32],
    want_u: bool,
    want_v: bool,
) {
    let (tps, xis) = (tiles_per_sample(conv), A * A);
    let (u, v_all) = saved.split_at_mut(u_len(conv));
    if want_u {
        transform_weights::<N, A, M, R, T>(conv, weight, u);
    }
    if want_v {
        let ranges = sample_ranges(n);
        let mut v_parts = split_by_ranges(&mut v_all[..xis * n * tps * conv.in_c], &ranges, xis * tps * conv.in_c);
        ranges.par_iter().zip(v_parts.par_iter_mut()).for_each(|(range, v)| {
            for chunk in tile_chunks(conv, range.clone(), BACKWARD_TILES) {
                let off = xis * (chunk.start - range.start * tps) * conv.in_c;
                transform_input::<N, A, M, R, T>(conv, input, chunk.clone(), &mut v[off..off + xis * chunk.len() * conv.in_c]);
            }
        });
    }
}

/// `backward` at `N` lanes, for variant `T`: dM of every tile (and the input gradient from it),
/// sample ranges in parallel, and the weight gradient summed over the batch in whichever of two
/// orders moves fewer bytes: each thread over its samples as it goes, the threads' partial dU
/// added after (the seed model's layers, AlexNet's conv1 and conv2: 2 x 6.3 MB of partials for
/// conv2 where its batch's dM is 51 MB), or, after the batch's dM is all made, each point over
/// every tile in one GEMM, points in parallel (AlexNet's conv3-conv5: 9.4 MB of dM where the
/// partials were 2 x 14 MB; their backward 3.5-4.5 ms faster in the training step).
fn backward_at<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
    conv: &Conv,
    n: usize,
    saved: &[f32],
    d_output: &[f32],
    mask_and_bias: Option<MaskAndBias>,
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
) {
    let (cin, cout, groups) = (conv.in_c, conv.out_c, conv.groups);
    let (cin_g, cout_g) = (cin / groups, cout / groups);
    let (tps, xis) = (tiles_per_sample(conv), A * A);
    let (u, v_all) = saved.split_at(u_len(conv));
    let (h, w) = (conv.win.h.output, conv.win.w.output);
    let (in_h, in_w, pad_h, pad_w) = (conv.win.h.input, conv.win.w.input, conv.win.h.pad_before, conv.win.w.pad_before);
    let ranges = sample_ranges(n);
    let mut d_ins: Vec<Option<&mut [f32]>> = match d_input {
        Some(dx) => split_by_ranges(&mut dx[..n * conv.in_len()], &ranges, conv.in_len()).into_iter().map(Some).collect(),
        None => ranges.iter().map(|_| None).collect(),
    };
    let want_dw = d_weight.is_some();
    let by_points = want_dw && xis * n * tps * cout < ranges.len() * u_len(conv);
    let by_samples = want_dw && !by_points;
    let mut dm_all = if by_points { take(xis * n * tps * cout) } else { Vec::new() };
    let mut dm_parts: Vec<&mut [f32]> = if by_points {
        split_by_ranges(&mut dm_all, &ranges, xis * tps * cout)
    } else {
        ranges.iter().map(|_| Default::default()).collect()
    };
    let mut partials: Vec<Vec<f32>> = ranges.iter().map(|_| if by_samples { take(u_len(conv)) } else { Vec::new() }).collect();
    let mask = mask_and_bias.as_ref().and_then(|m| m.output);
    let mut bias_partials: Vec<Vec<f32>> =
        ranges.iter().map(|_| if mask_and_bias.is_some() { take_zeroed(cout) } else { Vec::new() }).collect();
    let per_range = ranges.par_iter().zip(d_ins.par_iter_mut()).zip(dm_parts.par_iter_mut()).zip(partials.par_iter_mut());
    per_range.zip(bias_partials.par_iter_mut()).for_each(|((((range, dx), dm_range), du), db)| {
        let samples = range.start * conv.out_len()..range.end * conv.out_len();
        let (dy, y_out) = (&d_output[samples.clone()], mask.map(|y| &y[samples]));
        if let Some(dx) = dx.as_deref_mut() {
            dx.fill(0.0);
        }
        // The first chunk writes the partial dU, later ones accumulate: it needs no zeroing.
        for (nth, chunk) in tile_chunks(conv, range.clone(), BACKWARD_TILES).enumerate() {
            let t_count = chunk.len();
            let mut from_dm = |dm: &mut [f32]| {
                // dM = A dY A^T per tile (zero beyond the image), dY masked by the ReLU here
                // if not before, and summed into the bias gradient.
                for (t, tile) in chunk.clone().enumerate() {
                    let (nn, ty, tx) = tile_position(conv, tile);
                    let sample = (nn - range.start) * conv.out_len()..(nn - range.start + 1) * conv.out_len();
                    let (gy, out) = (&dy[sample.clone()], y_out.map(|y| &y[sample]));
                    let dmt = &mut dm[t * xis * cout..(t + 1) * xis * cout];
                    for co in (0..cout).step_by(N) {
                        let yt = tile_of::<N, M>(|i, j| {
                            let (y, x) = (M * ty + i, M * tx + j);
                            if y < h && x < w {
                                let at = (y * w + x) * cout + co;
                                let g = load(gy, at);
                                out.map_or(g, |out| g.where_positive(load(out, at)))
                            } else {
                                Lanes::default()
                            }
                        });
                        if !db.is_empty() {
                            // Positions beyond the image add exact zeros.
                            let sum = yt.iter().flatten().fold(load::<N>(db, co), |s, &v| s + v);
                            store(db, co, sum);
                        }
                        for (xi, val) in two_d!(&yt, T::a, M => A).iter().flatten().enumerate() {
                            store(dmt, xi * cout + co, *val);
                        }
                    }
                }
                // dU[xi] += V[xi]^T dM[xi], group by group.
                for (xi, g) in point_groups(xis, groups).filter(|_| by_samples) {
                    let v = &v_all[xis * chunk.start * cin..];
                    let (v_g, dm_g) = (slab(v, xis, cin, xi, g * cin_g, true), slab(dm, xis, cout, xi, g * cout_g, false));
                    matmul(cin_g, cout_g, t_count, v_g, dm_g, &mut du[xi * cout + g * cout_g..], xis * cout, nth > 0);
                }
                let Some(dx) = dx.as_deref_mut() else { return };
                with_scratch(&SCRATCH_C, xis * t_count * cin, |dv| {
                    // dV[xi] = dM[xi] U[xi]^T, then dX += B dV B^T over the AxA input tiles.
                    for (xi, g) in point_groups(xis, groups) {
                        matmul(
                            t_count,
                            cin_g,
                            cout_g,
                            slab(dm, xis, cout, xi, g * cout_g, false),
                            u_slab(u, conv, xi, g * cout_g, true),
                            &mut dv[xi * cin + g * cin_g..],
                            xis * cin,
                            false,
                        );
                    }
                    for (t, tile) in chunk.clone().enumerate() {
                        let (nn, ty, tx) = tile_position(conv, tile);
                        let gx = &mut dx[(nn - range.start) * conv.in_len()..(nn - range.start + 1) * conv.in_len()];
                        let dvt = &dv[t * xis * cin..(t + 1) * xis * cin];
                        for ch in (0..cin).step_by(N) {
                            let d = tile_of::<N, A>(|i, j| load(dvt, (i * A + j) * cin + ch));
                            for (i, row) in two_d!(&d, T::b, A => A).iter().enumerate() {
                                let iy = (M * ty + i).wrapping_sub(pad_h);
                                if iy >= in_h {
                                    continue;
                                }
                                for (j, val) in row.iter().enumerate() {
                                    let ix = (M * tx + j).wrapping_sub(pad_w);
                                    if ix < in_w {
                                        let o = (iy * in_w + ix) * cin + ch;
                                        store(gx, o, load(gx, o) + *val);
                                    }
                                }
                            }
                        }
                    }
                });
            };
            if by_points {
                let off = xis * (chunk.start - range.start * tps) * cout;
                from_dm(&mut dm_range[off..off + xis * t_count * cout]);
            } else {
                with_scratch(&SCRATCH_B, xis * t_count * cout, from_dm);
            }
        }
    });
    drop(dm_parts);
    match mask_and_bias {
        Some(m) => sum_partials(bias_partials, m.d_bias),
        None => bias_partials.into_iter().for_each(give_back),
    }
    let Some(d_weight) = d_weight else { return };
    // dU, channel-major as the threads' partials lay it out ([ci][xi][co]) or point-major ([xi][ci][co]).
    let mut du = take(u_len(conv));
    let (ci_stride, xi_stride) = if by_points {
        let tiles_all = n * tps;
        du.par_chunks_mut(cin_g * cout).enumerate().for_each(|(xi, du)| {
            for g in 0..groups {
                let (v_g, dm_g) = (slab(v_all, xis, cin, xi, g * cin_g, true), slab(&dm_all, xis, cout, xi, g * cout_g, false));
                matmul(cin_g, cout_g, tiles_all, v_g, dm_g, &mut du[g * cout_g..], cout, false);
            }
        });
        give_back(dm_all);
        (cout, cin_g * cout)
    } else {
        sum_partials(partials, &mut du);
        (xis * cout, cout)
    };
    // dW = G^T dU G back into HWIO: per input channel into [ci][k][co] (contiguous per task),
    // then transposed.
    let mut by_channel = take(R * R * cin_g * cout);
    by_channel.par_chunks_mut(R * R * cout).enumerate().for_each(|(ci, dw)| {
        for co in (0..cout).step_by(N) {
            let ut = tile_of::<N, A>(|i, j| load(&du, ci * ci_stride + (i * A + j) * xi_stride + co));
            for (k, v) in two_d!(&ut, T::gt, A => R).iter().flatten().enumerate() {
                store(dw, k * cout + co, *v);
            }
        }
    });
    d_weight.par_chunks_mut(cin_g * cout).enumerate().for_each(|(k, dw)| {
        for (ci, row) in dw.chunks_exact_mut(cout).enumerate() {
            row.copy_from_slice(&by_channel[(ci * R * R + k) * cout..(ci * R * R + k + 1) * cout]);
        }
    });
    give_back(by_channel);
    give_back(du);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::conv::{im2col_backward, im2col_forward, relu_bias_backward};
    use crate::layers::testing::random_vec;
    use crate::layers::{Padding, Window};

    /// Within `tolerance` of the largest reference value.
    fn close(what: &str, a: &[f32], b: &[f32], tolerance: f32) {
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tolerance * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// One variant's 1-D maps as matrices (column j: the map of the j-th unit vector), at one lane.
    fn matrix<const I: usize, const O: usize>(f: impl Fn([Lanes<1>; I]) -> [Lanes<1>; O]) -> Vec<Vec<f64>> {
        let mut m = vec![vec![0.0; I]; O];
        for j in 0..I {
            let mut e = [Lanes([0.0]); I];
            e[j] = Lanes([1.0]);
            for (i, v) in f(e).iter().enumerate() {
                m[i][j] = v.0[0] as f64;
            }
        }
        m
    }

    /// `A^T [(G g) . (B^T d)]` is the correlation `y[i] = sum_k g[k] d[i + k]` for every unit g
    /// and d (so for all, by linearity), and `b`, `a`, `gt` are the transposes of `bt`, `at`, `g`.
    fn check_maps<const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>() {
        let (bt, at, g) = (matrix(T::bt::<1>), matrix(T::at::<1>), matrix(T::g::<1>));
        // y[i] = sum over points x of at[i][x] * (G g)[x] * (B^T d)[x], for g = e_k and d = e_j.
        for (k, j) in (0..R).flat_map(|k| (0..A).map(move |j| (k, j))) {
            for (i, row) in at.iter().enumerate() {
                let y: f64 = row.iter().zip(&g).zip(&bt).map(|((a, g), bt)| a * g[k] * bt[j]).sum();
                let want = if j == i + k { 1.0 } else { 0.0 };
                assert!((y - want).abs() < 1e-5, "F({M}, {R}): output {i}, tap {k}, input {j}: {y}");
            }
        }
        let transposed = |m: &[Vec<f64>], t: Vec<Vec<f64>>, what: &str| {
            for (i, row) in m.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    assert!((v - t[j][i]).abs() < 1e-6, "F({M}, {R}): {what}[{j}][{i}]");
                }
            }
        };
        transposed(&bt, matrix(T::b::<1>), "b");
        transposed(&at, matrix(T::a::<1>), "a");
        transposed(&g, matrix(T::gt::<1>), "gt");
    }

    #[test]
    fn maps_compute_the_correlation() {
        check_maps::<9, 7, 3, F7x3>();
        check_maps::<8, 4, 5, F4x5>();
    }

    /// Every pass of variant `T` at `N` lanes against im2col (itself checked against naive
    /// loops and finite differences), SAME-padded and, where the kernel fits, unpadded.
    fn matches_im2col_at<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        groups: usize,
        batch: usize,
    ) {
        for padding in [Padding::Same, Padding::Valid].into_iter().filter(|&p| p == Padding::Same || (h >= R && w >= R)) {
            matches_im2col_padded::<N, A, M, R, T>(Window::new(h, w, R, 1, padding).unwrap(), cin, cout, groups, batch);
        }
    }

    fn matches_im2col_padded<const N: usize, const A: usize, const M: usize, const R: usize, T: Tile<A, M, R>>(
        win: Window,
        cin: usize,
        cout: usize,
        groups: usize,
        batch: usize,
    ) {
        let conv = Conv { win, in_c: cin, out_c: cout, groups, relu: true };
        let (h, w, padding) = (win.h.input, win.w.input, win.h.pad_before);
        assert!(applies(&conv));
        // Rounding grows with the taps summed and the tile: 5x5 kernels on 8x8 tiles stay
        // within 2.8e-5 of the largest value (AlexNet's conv2 at batch 5: 1.1e-5 in the input
        // gradient), 5.6e-5 unpadded, where every tile is full of data; 3x3 ones on 9x9 tiles,
        // whose maps sum more terms, within 1e-4 (the worst measured: 5.0e-5, the input
        // gradient of 7x7x128).
        let tolerance = if R == 3 {
            1e-4
        } else if padding == 0 {
            5.6e-5
        } else {
            2.8e-5
        };
        let x = random_vec(batch * conv.in_len(), 1);
        let wt = random_vec(conv.weight_len(), 2);
        let bias = random_vec(cout, 3);
        let (mut y_ref, mut y) = (vec![0.0; batch * conv.out_len()], vec![0.0; batch * conv.out_len()]);
        im2col_forward(&conv, batch, &x, &wt, &bias, &mut y_ref);
        let mut saved = vec![0.0; saved_len(&conv, batch)];
        forward_at::<N, A, M, R, T>(&conv, batch, &x, &wt, &bias, &mut y, Transforms::Keep(&mut saved));
        close(&format!("forward {h}x{w}x{cin} pad {padding}"), &y, &y_ref, tolerance);
        let mut prepared = vec![0.0; saved.len()];
        prepare_backward_at::<N, A, M, R, T>(&conv, batch, &x, &wt, &mut prepared, true, true);
        assert_eq!(prepared, saved, "prepare_backward lays U and V out as forward does");
        let unmasked = random_vec(y.len(), 4);
        let (mut dy, mut db_ref) = (unmasked.clone(), vec![0.0; cout]);
        relu_bias_backward(&conv, batch, &y_ref, &mut dy, &mut db_ref);
        let (mut dx_ref, mut dw_ref) = (vec![0.0; x.len()], vec![0.0; wt.len()]);
        im2col_backward(&conv, batch, &x, &wt, &dy, Some(&mut dx_ref), Some(&mut dw_ref));
        let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; wt.len()]);
        backward_at::<N, A, M, R, T>(&conv, batch, &saved, &dy, None, Some(&mut dx), Some(&mut dw));
        close(&format!("dx {h}x{w}x{cin} pad {padding}"), &dx, &dx_ref, tolerance);
        close(&format!("dw {h}x{w}x{cin} pad {padding}"), &dw, &dw_ref, tolerance);
        // The ReLU's mask and the bias gradient taken in the output gradient's transform: the
        // same input and weight gradients to the bit (the same masked values go in), the bias
        // gradient to rounding (summed tile by tile, not row by row).
        let (mut dx_fused, mut dw_fused, mut db) = (vec![f32::NAN; x.len()], vec![f32::NAN; wt.len()], vec![f32::NAN; cout]);
        let mask = Some(MaskAndBias { output: Some(&y_ref), d_bias: &mut db });
        backward_at::<N, A, M, R, T>(&conv, batch, &saved, &unmasked, mask, Some(&mut dx_fused), Some(&mut dw_fused));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&dx_fused) == bits(&dx) && bits(&dw_fused) == bits(&dw), "{h}x{w}x{cin} pad {padding}: masked in the transform");
        close(&format!("bias gradient {h}x{w}x{cin} pad {padding}"), &db, &db_ref, tolerance);
    }

    /// An evaluation workspace's kept U gives the bits a fresh U gives, for the weights at hand:
    /// remade when any weight's bits change (-0 for 0 included), reused while none does.
    #[test]
    fn cached_transforms_follow_the_weights() {
        let conv = Conv { win: Window::new(7, 7, 3, 1, Padding::Same).unwrap(), in_c: 16, out_c: 32, groups: 1, relu: false };
        let (batch, x, bias) = (2, random_vec(2 * conv.in_len(), 1), random_vec(32, 3));
        let fresh = |w: &[f32]| {
            let mut y = vec![0.0; batch * conv.out_len()];
            forward(&conv, batch, &x, w, &bias, &mut y, Transforms::Discard);
            y
        };
        let (mut of, mut u) = (Vec::new(), vec![0.0; u_len(&conv)]);
        let mut cached = |w: &[f32]| {
            let mut y = vec![0.0; batch * conv.out_len()];
            forward(&conv, batch, &x, w, &bias, &mut y, Transforms::Cache { of: &mut of, u: &mut u });
            y
        };
        let bits = |y: Vec<f32>| y.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let mut w = random_vec(conv.weight_len(), 2);
        w[5] = 0.0;
        let mut versions = vec![w.clone(), w.clone()];
        w[100] += 0.25;
        versions.push(w.clone());
        w[5] = -0.0;
        versions.push(w.clone());
        versions.push(w.clone());
        for w in &versions {
            assert_eq!(bits(cached(w)), bits(fresh(w)));
        }
    }

    /// Both variants at both vector widths on any machine: 16 lanes (AVX-512's) and 8 (AVX2's)
    /// give the same results, on tile-aligned and ragged maps (5x5 also smaller than a tile),
    /// with one group and with two (groups need not be a multiple of the width).
    #[test]
    fn both_vector_widths_match_im2col() {
        for (h, w, cin, cout, groups, batch) in
            [(8, 8, 16, 32, 1, 2), (14, 14, 32, 16, 1, 3), (7, 7, 16, 16, 1, 5), (5, 9, 48, 16, 1, 1), (7, 6, 16, 32, 2, 2)]
        {
            matches_im2col_at::<8, 9, 7, 3, F7x3>(h, w, cin, cout, groups, batch);
            matches_im2col_at::<16, 9, 7, 3, F7x3>(h, w, cin, cout, groups, batch);
        }
        for (h, w, cin, cout, groups, batch) in
            [(8, 8, 16, 32, 1, 2), (9, 9, 32, 16, 1, 3), (5, 7, 16, 16, 1, 2), (1, 3, 16, 32, 1, 2), (9, 8, 32, 16, 2, 2)]
        {
            matches_im2col_at::<8, 8, 4, 5, F4x5>(h, w, cin, cout, groups, batch);
            matches_im2col_at::<16, 8, 4, 5, F4x5>(h, w, cin, cout, groups, batch);
        }
        // Channels that are multiples of 8 only run at 8 lanes.
        matches_im2col_at::<8, 9, 7, 3, F7x3>(6, 6, 8, 24, 1, 2);
        matches_im2col_at::<8, 8, 4, 5, F4x5>(6, 6, 8, 24, 1, 2);
    }

    /// The seed model's conv2 and conv3 and AlexNet's conv2 (one tower and two) at batches
    /// that give each thread several forward and backward chunks (the dU accumulation across
    /// chunks, V kept per chunk, chunks ending inside a sample). At these batches each thread
    /// sums its own samples' dU; the small shapes above take the other order, points over the
    /// batch's dM.
    #[test]
    #[cfg_attr(debug_assertions, ignore = "release only: full-size layers at batch 6-140")]
    fn several_chunks_per_thread_match_im2col() {
        matches_im2col_at::<L, 9, 7, 3, F7x3>(14, 14, 64, 128, 1, 40);
        matches_im2col_at::<L, 9, 7, 3, F7x3>(7, 7, 128, 256, 1, 140);
        // 49 tiles per sample: 5-6 samples a thread are 245-294 tiles, two or three forward
        // chunks and two backward ones, each ending inside a sample.
        matches_im2col_at::<L, 8, 4, 5, F4x5>(27, 27, 96, 256, 1, 11);
        matches_im2col_at::<L, 8, 4, 5, F4x5>(27, 27, 96, 256, 2, 6);
    }
}
