//! `N` f32 lanes as a plain array type whose element-wise operators LLVM turns into single
//! vector instructions: portable code for the kernels that are not GEMMs (Winograd transforms,
//! pooling, direct convolution), which then vectorise regardless of how their loops are shaped.
//! Written once, generic over the width; the engine uses the target's full width `L`, and the
//! tests run the kernels at both 8 and 16 lanes on any machine.

use super::aligned::LINE;

/// The vector width the kernels use: 16 lanes where the build targets AVX-512 (one zmm
/// register), 8 otherwise (one AVX2 ymm register, or two NEON registers).
pub const L: usize = if cfg!(target_feature = "avx512f") { 16 } else { 8 };

/// Whether the build target has fused multiply-add instructions (x86-64 with FMA, which every
/// AVX2 and AVX-512 CPU has; aarch64 always).
const HAS_FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));

/// The narrowest width any kernel runs at: layers whose channel counts are multiples of 8 but
/// not of `L` run at this one.
pub const MIN_L: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lanes<const N: usize>(pub [f32; N]);

impl<const N: usize> Default for Lanes<N> {
    #[inline(always)]
    fn default() -> Self {
        Lanes([0.0; N])
    }
}

/// The lane-wise operations, as `a = op(a, b)`.
#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    /// `a = a + s * b`, fused where the target has FMA.
    MulAdd(f32),
}

impl Op {
    /// One lane: the definition, and the path for widths and targets without `zmm`.
    #[inline(always)]
    fn lane(self, a: f32, b: f32) -> f32 {
        match self {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
            // Without FMA hardware `f32::mul_add` is a library call, so there it stays two.
            Op::MulAdd(s) => {
                if HAS_FMA {
                    s.mul_add(b, a)
                } else {
                    a + s * b
                }
            }
        }
    }
}

/// AVX-512 operations on whole zmm registers, for widths that are multiples of 16. Written
/// with the ISA's intrinsics because LLVM's tuning for Intel server cores (`prefer-256-bit`)
/// makes its vectorisers split plain lane loops into pairs of 256-bit instructions; explicit
/// 512-bit operations stay whole. The same bits as `Op::lane`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod zmm {
    use super::Op;
    use std::arch::x86_64::*;

    /// Whether `N` lanes are whole zmm registers.
    pub const fn whole<const N: usize>() -> bool {
        N.is_multiple_of(16)
    }

    /// `to = from` a register at a time (`whole::<N>()` holds): the copies between slices and
    /// lane arrays, which LLVM would otherwise move as ymm halves, and a zmm load of a value
    /// just stored as two halves waits for both stores to retire (no store forwarding).
    #[inline(always)]
    pub fn copy<const N: usize>(to: &mut [f32; N], from: &[f32; N]) {
        for k in (0..N).step_by(16) {
            // SAFETY: k + 16 <= N since N is a multiple of 16; AVX-512F is enabled (module cfg).
            unsafe { _mm512_storeu_ps(to.as_mut_ptr().add(k), _mm512_loadu_ps(from.as_ptr().add(k))) }
        }
    }

    /// `to = from` for fewer than 16 floats, as one masked load and store.
    #[inline(always)]
    pub fn copy_tail(to: &mut [f32], from: &[f32]) {
        assert!(to.len() < 16 && to.len() == from.len());
        let mask = ((1u32 << to.len()) - 1) as u16;
        // SAFETY: the mask limits both accesses to the slices' floats, which the assert makes
        // the same number (masked-off lanes neither fault nor write); AVX-512F is on.
        unsafe { _mm512_mask_storeu_ps(to.as_mut_ptr(), mask, _mm512_maskz_loadu_ps(mask, from.as_ptr())) }
    }

    /// `permute_block`: a two-register permute per 16 floats.
    #[inline(always)]
    pub fn permute_block<const M: usize>(to: &mut [[f32; 16]; M], block: &[f32; 32], index: &[[u8; 16]; M]) {
        // SAFETY: the block is 32 floats, read as two registers; AVX-512F is on.
        let block = unsafe { (_mm512_loadu_ps(block.as_ptr()), _mm512_loadu_ps(block.as_ptr().add(16))) };
        permute_registers(to, block, index);
    }

    /// `permute_block` of a block in two registers.
    #[inline(always)]
    fn permute_registers<const M: usize>(to: &mut [[f32; 16]; M], (lo, hi): (__m512, __m512), index: &[[u8; 16]; M]) {
        // SAFETY: each output is 16 floats and 16 index bytes; the permute reads only its
        // registers' lanes; AVX-512F is on (module cfg).
        unsafe {
            for (to, index) in to.iter_mut().zip(index) {
                let i = _mm512_cvtepu8_epi32(_mm_loadu_si128(index.as_ptr().cast()));
                _mm512_storeu_ps(to.as_mut_ptr(), _mm512_permutex2var_ps(lo, i, hi));
            }
        }
    }

    /// `pack_columns`: the block permuted in the registers `block_registers` packed it in.
    #[inline(always)]
    pub fn pack_columns<const M: usize>(
        to: &mut [[f32; 16]; M],
        from: &[f32],
        at: usize,
        stride: usize,
        side: usize,
        index: &[[u8; 16]; M],
    ) {
        permute_registers(to, block_registers(from, at, stride, side), index);
    }

    /// `pack_columns`' block in two registers: each row's run merged into its lanes by masked
    /// loads (at addresses shifted back by the lane it starts at). (Copied run by run with
    /// masked stores, which cannot forward to the whole loads that read the block back, the
    /// seed model's conv1 backward took 1.07x as long.)
    #[inline(always)]
    fn block_registers(from: &[f32], at: usize, stride: usize, side: usize) -> (__m512, __m512) {
        // SAFETY: AVX-512F is on (module cfg).
        let (mut lo, mut hi) = unsafe { (_mm512_setzero_ps(), _mm512_setzero_ps()) };
        for r in 0..side {
            let lanes = ((1u64 << side) - 1) << (r * side);
            // Lane l of the shifted addresses reads row[l - r * side] (lo) and row[l + 16 -
            // r * side] (hi): the masks pick exactly the row's `side` floats.
            let row = from[at + r * stride..][..side].as_ptr();
            let (lo_at, hi_at) = (row.wrapping_sub(r * side), row.wrapping_sub(r * side).wrapping_add(16));
            // SAFETY: only masked-in lanes are read (masked-off lanes neither fault nor read),
            // and those are the row's floats, which the slice above bounds; AVX-512F is on.
            unsafe {
                if lanes as u16 != 0 {
                    lo = _mm512_mask_loadu_ps(lo, lanes as u16, lo_at);
                }
                if (lanes >> 16) as u16 != 0 {
                    hi = _mm512_mask_loadu_ps(hi, (lanes >> 16) as u16, hi_at);
                }
            }
        }
        (lo, hi)
    }

    /// `window_max_arg` (`whole::<N>()` holds): four registers at a time where they fit,
    /// else one (`window_max_arg_group`).
    #[cfg(all(target_feature = "avx512bw", target_feature = "avx512vl"))]
    #[inline(always)]
    pub fn window_max_arg<const N: usize>(
        x: &[f32],
        taps: &[(usize, usize)],
        c: usize,
        cb: usize,
        nowhere: Option<u8>,
        best: &mut [f32; N],
        arg: &mut [u8; N],
    ) {
        super::register_groups(N, 16, |k, registers| match registers {
            4 => window_max_arg_group::<4>(x, taps, c, cb + k, nowhere, &mut best[k..k + 64], &mut arg[k..k + 64]),
            _ => window_max_arg_group::<1>(x, taps, c, cb + k, nowhere, &mut best[k..k + 16], &mut arg[k..k + 16]),
        });
    }

    /// `G` registers of 16 lanes of `window_max_arg`, the maxima and the argmax bytes in
    /// registers over every tap: per tap and register a load, a compare into a mask and two
    /// masked moves by it. (`vmaxps` in place of the first, the same bits, took the 16-lane
    /// pool1 forward 1.04x the time, Zen 4.)
    #[cfg(all(target_feature = "avx512bw", target_feature = "avx512vl"))]
    #[inline(always)]
    fn window_max_arg_group<const G: usize>(
        x: &[f32],
        taps: &[(usize, usize)],
        c: usize,
        cb: usize,
        nowhere: Option<u8>,
        best_out: &mut [f32],
        arg_out: &mut [u8],
    ) {
        assert!(best_out.len() == 16 * G && arg_out.len() == 16 * G, "whole groups");
        // SAFETY: each tap's row is sliced to the 16G floats read; the outputs hold 16G floats
        // and bytes (asserted); the build enables AVX-512F, BW and VL (this function's cfg).
        unsafe {
            let mut best = [_mm512_set1_ps(f32::NEG_INFINITY); G];
            let mut arg = [_mm_set1_epi8(taps.first().map_or(0, |t| t.0) as i8); G];
            for &(t, i) in taps {
                let row = x[i * c + cb..][..16 * G].as_ptr();
                let tap = _mm_set1_epi8(t as i8);
                for (j, (best, arg)) in best.iter_mut().zip(&mut arg).enumerate() {
                    let v = _mm512_loadu_ps(row.add(16 * j));
                    let wins = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, *best);
                    *best = _mm512_mask_mov_ps(*best, wins, v);
                    *arg = _mm_mask_blend_epi8(wins, *arg, tap);
                }
            }
            for (j, (best, arg)) in best.iter().zip(&mut arg).enumerate() {
                if let Some(nowhere) = nowhere {
                    let zeroed = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(*best, _mm512_setzero_ps());
                    *arg = _mm_mask_blend_epi8(zeroed, *arg, _mm_set1_epi8(nowhere as i8));
                }
                _mm512_storeu_ps(best_out.as_mut_ptr().add(16 * j), *best);
                _mm_storeu_si128(arg_out.as_mut_ptr().add(16 * j).cast(), *arg);
            }
        }
    }

    /// `g` where `y > 0`, else +0 (`whole::<N>()` holds): a compare into a mask and a
    /// zero-masked move per 16 lanes.
    #[inline(always)]
    pub fn where_positive<const N: usize>(g: &mut [f32; N], y: &[f32; N]) {
        for k in (0..N).step_by(16) {
            // SAFETY: k + 16 <= N (N a multiple of 16); AVX-512F is enabled (module cfg).
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_loadu_ps(y.as_ptr().add(k)), _mm512_setzero_ps());
                _mm512_storeu_ps(g.as_mut_ptr().add(k), _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(g.as_ptr().add(k))));
            }
        }
    }

    /// `Lanes::add_unless` (`whole::<N>()` holds): a byte compare into a mask, a zero-masked
    /// load and an add per 16 lanes.
    #[cfg(all(target_feature = "avx512bw", target_feature = "avx512vl"))]
    #[inline(always)]
    pub fn add_unless<const N: usize>(sum: &mut [f32; N], g: &[f32; N], arg: &[u8; N], skip: u8) {
        for k in (0..N).step_by(16) {
            // SAFETY: k + 16 <= N (N a multiple of 16) for the 16 floats and bytes read and the
            // floats written; the build enables AVX-512F, BW and VL (this function's cfg).
            unsafe {
                let keep = _mm_cmpneq_epi8_mask(_mm_loadu_si128(arg.as_ptr().add(k).cast()), _mm_set1_epi8(skip as i8));
                let g = _mm512_maskz_loadu_ps(keep, g.as_ptr().add(k));
                _mm512_storeu_ps(sum.as_mut_ptr().add(k), _mm512_add_ps(_mm512_loadu_ps(sum.as_ptr().add(k)), g));
            }
        }
    }

    /// `Lanes::neighbourhood_mul_add` (`whole::<N>()` holds): per 16 lanes, the argmax widened
    /// to 32 bits, a compare into a mask that zeroes the skipped lanes' gradient as it loads, its
    /// add into `sum`, the base index by a 16-entry permute and the three rows' indices from
    /// it, and per tap a permute of its column (a register) and an FMA.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn neighbourhood_mul_add<const N: usize>(
        acc: &mut [[f32; N]; 9],
        sum: &mut [f32; N],
        columns: &[[f32; 16]; 3],
        g: &[f32; N],
        arg: &[u8; N],
        base: &[u32; 16],
        row_step: usize,
        skip: u8,
    ) {
        // SAFETY: k + 16 <= N (N a multiple of 16) for the 16 floats, bytes and sums read and
        // written; each column is 16 floats, the base table 16 integers; the permutes read
        // only their registers' lanes; AVX-512F is enabled (module cfg).
        unsafe {
            let base = _mm512_loadu_si512(base.as_ptr().cast());
            let columns = columns.map(|c| _mm512_loadu_ps(c.as_ptr()));
            for k in (0..N).step_by(16) {
                let a = _mm512_cvtepu8_epi32(_mm_loadu_si128(arg.as_ptr().add(k).cast()));
                let keep = _mm512_cmpneq_epi32_mask(a, _mm512_set1_epi32(skip as i32));
                let g = _mm512_maskz_loadu_ps(keep, g.as_ptr().add(k));
                _mm512_storeu_ps(sum.as_mut_ptr().add(k), _mm512_add_ps(_mm512_loadu_ps(sum.as_ptr().add(k)), g));
                let corner = _mm512_permutexvar_epi32(a, base);
                let rows = [0, 1, 2].map(|ky| _mm512_add_epi32(corner, _mm512_set1_epi32((ky * row_step) as i32)));
                for (r, sum) in acc.iter_mut().enumerate() {
                    let v = _mm512_permutexvar_ps(rows[r / 3], columns[r % 3]);
                    let s = _mm512_loadu_ps(sum.as_ptr().add(k));
                    _mm512_storeu_ps(sum.as_mut_ptr().add(k), _mm512_fmadd_ps(g, v, s));
                }
            }
        }
    }

    /// Bit l set where `v[l]` is nonzero (-0 counts as zero), over 16 lanes from `at` (fewer
    /// where `v` ends first: the others are clear).
    #[inline(always)]
    pub fn nonzero_mask(v: &[f32], at: usize) -> u16 {
        let n = (v.len() - at).min(16);
        let lanes = ((1u32 << n) - 1) as u16;
        // SAFETY: the mask limits the load to the n floats of `v` from `at` (masked-off lanes
        // neither fault nor count); AVX-512F is enabled (module cfg).
        unsafe {
            let x = _mm512_maskz_loadu_ps(lanes, v.as_ptr().add(at));
            _mm512_test_epi32_mask(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fff_ffff))
        }
    }

    /// `a = op(a, b)` a register at a time (`whole::<N>()` holds).
    #[inline(always)]
    pub fn apply<const N: usize>(op: Op, a: &mut [f32; N], b: &[f32; N]) {
        for k in (0..N).step_by(16) {
            // SAFETY: k + 16 <= N since N is a multiple of 16, so both reads and the write stay
            // in the arrays; the build enables AVX-512F (this module's cfg).
            unsafe {
                let (x, y) = (_mm512_loadu_ps(a.as_ptr().add(k)), _mm512_loadu_ps(b.as_ptr().add(k)));
                let r = match op {
                    Op::Add => _mm512_add_ps(x, y),
                    Op::Sub => _mm512_sub_ps(x, y),
                    Op::Mul => _mm512_mul_ps(x, y),
                    Op::MulAdd(s) => _mm512_fmadd_ps(_mm512_set1_ps(s), y, x),
                };
                _mm512_storeu_ps(a.as_mut_ptr().add(k), r);
            }
        }
    }
}

/// AVX2 operations on whole ymm registers, for widths that are multiples of 8: what LLVM does
/// not find in the lane loops. (AVX-512 builds have them too, for the 8-lane kernels the tests
/// run.) The same bits as the lane loops.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod ymm {
    use std::arch::x86_64::*;

    /// Whether `N` lanes are whole ymm registers.
    pub const fn whole<const N: usize>() -> bool {
        N.is_multiple_of(8)
    }

    /// `window_max_arg` (`whole::<N>()` holds): four registers at a time where they fit,
    /// else one (`window_max_arg_group`).
    #[inline(always)]
    pub fn window_max_arg<const N: usize>(
        x: &[f32],
        taps: &[(usize, usize)],
        c: usize,
        cb: usize,
        nowhere: Option<u8>,
        best: &mut [f32; N],
        arg: &mut [u8; N],
    ) {
        super::register_groups(N, 8, |k, registers| match registers {
            4 => window_max_arg_group::<4>(x, taps, c, cb + k, nowhere, &mut best[k..k + 32], &mut arg[k..k + 32]),
            _ => window_max_arg_group::<1>(x, taps, c, cb + k, nowhere, &mut best[k..k + 8], &mut arg[k..k + 8]),
        });
    }

    /// `G` registers of 8 lanes of `window_max_arg`, the maxima and the argmax (as 32-bit
    /// lanes) in registers over every tap: per tap and register a load, a compare and two
    /// blends by it; the argmax packed to bytes once. (Tap by tap through memory, with the
    /// compares' masks packed to bytes each time, the seed model's pool1 forward took 1.19x the
    /// time: 11.3 us a sample on one core, 8-lane build on a Zen 4.)
    #[inline(always)]
    fn window_max_arg_group<const G: usize>(
        x: &[f32],
        taps: &[(usize, usize)],
        c: usize,
        cb: usize,
        nowhere: Option<u8>,
        best_out: &mut [f32],
        arg_out: &mut [u8],
    ) {
        assert!(best_out.len() == 8 * G && arg_out.len() == 8 * G && (G == 1 || G == 4), "whole groups");
        // SAFETY: each tap's row is sliced to the 8G floats read; the outputs hold 8G floats and
        // bytes (asserted); AVX2 is enabled (module cfg).
        unsafe {
            let mut best = [_mm256_set1_ps(f32::NEG_INFINITY); G];
            let mut arg = [_mm256_set1_epi32(taps.first().map_or(0, |t| t.0) as i32); G];
            for &(t, i) in taps {
                let row = x[i * c + cb..][..8 * G].as_ptr();
                let tap = _mm256_set1_epi32(t as i32);
                for (j, (best, arg)) in best.iter_mut().zip(&mut arg).enumerate() {
                    let v = _mm256_loadu_ps(row.add(8 * j));
                    let wins = _mm256_cmp_ps::<_CMP_GT_OQ>(v, *best);
                    *best = _mm256_blendv_ps(*best, v, wins);
                    *arg = _mm256_blendv_epi8(*arg, tap, _mm256_castps_si256(wins));
                }
            }
            if let Some(nowhere) = nowhere {
                let nowhere = _mm256_set1_epi32(i32::from(nowhere));
                for (best, arg) in best.iter().zip(&mut arg) {
                    let zeroed = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(*best, _mm256_setzero_ps()));
                    *arg = _mm256_blendv_epi8(*arg, nowhere, zeroed);
                }
            }
            for (j, best) in best.iter().enumerate() {
                _mm256_storeu_ps(best_out.as_mut_ptr().add(8 * j), *best);
            }
            // Bytes 0..=255 through signed 16-bit and unsigned 8-bit saturation unchanged.
            if G == 4 {
                // Per 128-bit half, the packs leave 4-lane groups in the order 0 1 2 3 (lanes
                // 0-3), then 0 1 2 3 (lanes 4-7).
                let packed = _mm256_packus_epi16(_mm256_packs_epi32(arg[0], arg[1]), _mm256_packs_epi32(arg[2], arg[3]));
                let bytes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(arg_out.as_mut_ptr().cast(), bytes);
            } else {
                let words = _mm_packs_epi32(_mm256_castsi256_si128(arg[0]), _mm256_extracti128_si256::<1>(arg[0]));
                _mm_storel_epi64(arg_out.as_mut_ptr().cast(), _mm_packus_epi16(words, words));
            }
        }
    }

    /// `permute_block`: per 8 floats, a permute of each of the block's four registers, the
    /// index's bit 3 picking of each pair and bit 4 of the two. (AVX-512 builds run it in
    /// the tests only.)
    #[cfg_attr(all(target_feature = "avx512f", not(test)), allow(dead_code))]
    #[inline(always)]
    pub fn permute_block<const M: usize>(to: &mut [[f32; 16]; M], block: &[f32; 32], index: &[[u8; 16]; M]) {
        // SAFETY: the block is 32 floats, read as four registers, each output 16 floats and 16
        // index bytes, read and written 8 at a time; the permutes read only their registers'
        // lanes; AVX2 is enabled (module cfg).
        unsafe {
            let b = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(block.as_ptr().add(k)));
            for (to, index) in to.iter_mut().zip(index) {
                for k in [0, 8] {
                    let i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(index.as_ptr().add(k).cast()));
                    let (bit3, bit4) = (_mm256_castsi256_ps(_mm256_slli_epi32::<28>(i)), _mm256_castsi256_ps(_mm256_slli_epi32::<27>(i)));
                    let pick = |lo, hi| _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i), bit3);
                    _mm256_storeu_ps(to.as_mut_ptr().add(k), _mm256_blendv_ps(pick(b[0], b[1]), pick(b[2], b[3]), bit4));
                }
            }
        }
    }

    /// `Lanes::neighbourhood_mul_add` (`whole::<N>()` holds): per 8 lanes, the argmax
    /// widened to 32 bits, the skipped lanes' gradient zeroed, the base index looked up in two
    /// registers; per tap, the 8 floats from the tap's row permuted by that index, the ninth
    /// blended into the lanes whose index is 8 (its bit 3), and an FMA. (With the neighbourhood
    /// as rows, base indices to 12, each tap took two permutes of 8 and a blend: the seed
    /// model's conv1 backward 1.14x the time, warm, 8-lane build on a Zen 4.)
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn neighbourhood_mul_add<const N: usize>(
        acc: &mut [[f32; N]; 9],
        sum: &mut [f32; N],
        columns: &[[f32; 16]; 3],
        g: &[f32; N],
        arg: &[u8; N],
        base: &[u32; 16],
        row_step: usize,
        skip: u8,
    ) {
        // SAFETY: k + 8 <= N (N a multiple of 8) for the 8 floats, bytes and sums read and
        // written; the base table is 16 integers, read as two registers; each tap reads the 9
        // floats from its row on, inside its column (`neighbourhood_mul_add`'s contract:
        // `2 * row_step + 8 < 16`); the permutes read only their registers' lanes; AVX2 and
        // FMA are enabled (module cfg).
        unsafe {
            let (base_lo, base_hi) = (_mm256_loadu_si256(base.as_ptr().cast()), _mm256_loadu_si256(base.as_ptr().add(8).cast()));
            for k in (0..N).step_by(8) {
                let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(arg.as_ptr().add(k).cast()));
                let skipped = _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_set1_epi32(skip as i32)));
                let g = _mm256_andnot_ps(skipped, _mm256_loadu_ps(g.as_ptr().add(k)));
                _mm256_storeu_ps(sum.as_mut_ptr().add(k), _mm256_add_ps(_mm256_loadu_ps(sum.as_ptr().add(k)), g));
                // base[a % 16]: bit 3 of a (moved to the sign bit) picks the register.
                let corner = _mm256_castps_si256(_mm256_blendv_ps(
                    _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(base_lo, a)),
                    _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(base_hi, a)),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<28>(a)),
                ));
                // Base indices are 8 at most: bit 3 marks the lanes that take the ninth float.
                let ninth = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(corner));
                for (r, sum) in acc.iter_mut().enumerate() {
                    let from = columns[r % 3].as_ptr().add(r / 3 * row_step);
                    let v = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(from), corner),
                        _mm256_broadcast_ss(&*from.add(8)),
                        ninth,
                    );
                    let s = _mm256_loadu_ps(sum.as_ptr().add(k));
                    _mm256_storeu_ps(sum.as_mut_ptr().add(k), _mm256_fmadd_ps(g, v, s));
                }
            }
        }
    }
}

impl<const N: usize> Lanes<N> {
    /// Whether `neighbourhood_mul_add` looks lanes up by vector permutes at this width (else
    /// lane by lane).
    pub const PERMUTES_NEIGHBOURHOODS: bool = (cfg!(all(target_arch = "x86_64", target_feature = "avx512f")) && N.is_multiple_of(16))
        || (cfg!(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")) && N.is_multiple_of(8));

    /// `op(self, b)` lane by lane, as whole zmm registers where there are some.
    #[inline(always)]
    fn apply(mut self, op: Op, b: Lanes<N>) -> Lanes<N> {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        if zmm::whole::<N>() {
            zmm::apply(op, &mut self.0, &b.0);
            return self;
        }
        for l in 0..N {
            self.0[l] = op.lane(self.0[l], b.0[l]);
        }
        self
    }
}

impl<const N: usize> std::ops::Add for Lanes<N> {
    type Output = Lanes<N>;
    #[inline(always)]
    fn add(self, o: Lanes<N>) -> Lanes<N> {
        self.apply(Op::Add, o)
    }
}
impl<const N: usize> std::ops::Sub for Lanes<N> {
    type Output = Lanes<N>;
    #[inline(always)]
    fn sub(self, o: Lanes<N>) -> Lanes<N> {
        self.apply(Op::Sub, o)
    }
}
impl<const N: usize> std::ops::Mul<Lanes<N>> for f32 {
    type Output = Lanes<N>;
    #[inline(always)]
    fn mul(self, o: Lanes<N>) -> Lanes<N> {
        o.apply(Op::Mul, Lanes::splat(self))
    }
}

impl<const N: usize> Lanes<N> {
    #[inline(always)]
    pub fn splat(v: f32) -> Lanes<N> {
        Lanes([v; N])
    }
    /// `self + a * b` lane-wise, as one fused multiply-add per lane where the target has them
    /// (Rust never contracts `x + a * b` into one: written so, it is a multiply and an add, half
    /// the rate).
    #[inline(always)]
    pub fn mul_add(self, a: f32, b: Lanes<N>) -> Lanes<N> {
        self.apply(Op::MulAdd(a), b)
    }
    /// `self + g` lane by lane, `g` taken as +0 where `arg` is `skip`. With AVX-512, a byte
    /// compare into a mask, a zero-masked load and an add per 16 lanes.
    #[inline(always)]
    pub fn add_unless(mut self, g: &[f32; N], arg: &[u8; N], skip: u8) -> Lanes<N> {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512bw", target_feature = "avx512vl"))]
        if zmm::whole::<N>() {
            zmm::add_unless(&mut self.0, g, arg, skip);
            return self;
        }
        for l in 0..N {
            // A select as a mask of bits (a branch per lane kept LLVM from vectorising).
            let keep = ((arg[l] != skip) as u32).wrapping_neg();
            self.0[l] += f32::from_bits(g[l].to_bits() & keep);
        }
        self
    }

    /// The multiply-adds of one gradient vector into the sums of the 9 taps (ky, kx) of a 3x3
    /// convolution (`acc[3 ky + kx]`), each lane looking its tap's input up in three columns of
    /// 16 floats (a pooled output's input neighbourhood, by kx): `acc[3 ky + kx][l] += g[l] *
    /// columns[kx][ky * row_step + base[arg[l] % 16]]`, for base entries of 8 at most and
    /// `row_step` of 3 at most (the 9 floats from each tap's row lie inside its column), and
    /// the gradient itself into `sum` (`sum[l] += g[l]`: `add_unless`'s sum, for a bias), with
    /// `g[l]` taken as +0 where `arg[l] == skip`. With AVX-512, a permute of the tap's column
    /// looks 16 lanes up at a time; with AVX2, a permute of the row's first 8 floats and the
    /// ninth blended in, 8; elsewhere lane by lane. (The taps' rows are worked out in the
    /// loop: from a table of 9 offsets, the AVX2 kernel spilled its sums to the stack.)
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn neighbourhood_mul_add(
        acc: &mut [Lanes<N>; 9],
        sum: &mut Lanes<N>,
        columns: &[[f32; 16]; 3],
        g: &[f32; N],
        arg: &[u8; N],
        base: &[u32; 16],
        row_step: usize,
        skip: u8,
    ) {
        debug_assert!(row_step <= 3 && base.iter().all(|&b| b <= 8), "rows of 9 floats inside the columns");
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        if zmm::whole::<N>() {
            let mut sums = acc.map(|a| a.0);
            zmm::neighbourhood_mul_add(&mut sums, &mut sum.0, columns, g, arg, base, row_step, skip);
            *acc = sums.map(Lanes);
            return;
        }
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if ymm::whole::<N>() {
            let mut sums = acc.map(|a| a.0);
            ymm::neighbourhood_mul_add(&mut sums, &mut sum.0, columns, g, arg, base, row_step, skip);
            *acc = sums.map(Lanes);
            return;
        }
        for l in 0..N {
            let g = if arg[l] == skip { 0.0 } else { g[l] };
            sum.0[l] += g;
            let corner = base[usize::from(arg[l] % 16)] as usize;
            for (r, sum) in acc.iter_mut().enumerate() {
                let v = columns[r % 3][r / 3 * row_step + corner];
                sum.0[l] = Op::MulAdd(g).lane(sum.0[l], v);
            }
        }
    }

    /// The ReLU's mask on a gradient, lane by lane (`relu_mask`).
    #[inline(always)]
    pub fn where_positive(mut self, y: Lanes<N>) -> Lanes<N> {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        if zmm::whole::<N>() {
            zmm::where_positive(&mut self.0, &y.0);
            return self;
        }
        for (g, y) in self.0.iter_mut().zip(y.0) {
            *g = relu_mask(*g, y);
        }
        self
    }
    /// Lane-wise `max(self, 0)`.
    #[inline(always)]
    pub fn relu(mut self) -> Lanes<N> {
        self.0.iter_mut().for_each(|x| *x = x.max(0.0));
        self
    }
}

/// Run `$body` over the channels `$range` in blocks of 4L (or `wide = W` channels), half that,
/// L, then 1 channels: `$c` is a block's first channel and `$n` its width, as a constant, since
/// the kernels take it as a const generic (which a closure cannot pass on). Four vectors a block
/// hide the latency of the kernels' dependent adds; the narrower blocks take what is left.
macro_rules! for_lane_blocks {
    ($range:expr, |$c:ident, $n:ident| $body:expr) => {
        $crate::layers::simd::for_lane_blocks!($range, wide = 4 * $crate::layers::simd::L, |$c, $n| $body)
    };
    ($range:expr, wide = $wide:expr, |$c:ident, $n:ident| $body:expr) => {{
        let range: std::ops::Range<usize> = $range;
        let mut $c = range.start;
        while $c < range.end {
            $c += match range.end - $c {
                left if left >= $wide => {
                    const $n: usize = $wide;
                    $body;
                    $n
                }
                // Half the wide block where it is wider than that (the paper's 96 channels
                // are 64 + 32, not 64 + 16 + 16, whose one-vector blocks left the FMA pipes
                // waiting on each sum's latency).
                left if $wide > 2 * $crate::layers::simd::L && left >= $wide / 2 => {
                    const $n: usize = $wide / 2;
                    $body;
                    $n
                }
                left if left >= $crate::layers::simd::L => {
                    const $n: usize = $crate::layers::simd::L;
                    $body;
                    $n
                }
                _ => {
                    const $n: usize = 1;
                    $body;
                    $n
                }
            };
        }
    }};
}
pub(crate) use for_lane_blocks;

/// The ReLU's mask on one gradient `g`: `g` where the output `y > 0`, else +0 (a NaN output
/// masks). A bit mask rather than a select: LLVM turns `if y > 0 { g } else { 0 }` into a
/// masked store, which is microcoded and slow on AMD.
#[inline(always)]
pub fn relu_mask(g: f32, y: f32) -> f32 {
    let keep = if y > 0.0 { u32::MAX } else { 0 };
    f32::from_bits(g.to_bits() & keep)
}

/// Whether `v` is nonzero (-0 counts as zero): its bits less the sign.
#[inline(always)]
pub fn is_nonzero(v: f32) -> bool {
    v.to_bits() << 1 != 0
}

/// The first and last index of a nonzero (`is_nonzero`) in `v`, if any. With AVX-512, a mask
/// of 16 lanes at a time from each end (a scalar search from each end took 3-4% of a profile of
/// the seed model's conv1 + pool1, which looks for the nonzero span of every padded row of a
/// digit, twice a step).
#[inline(always)]
pub fn nonzero_bounds(v: &[f32]) -> Option<(usize, usize)> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        let first = (0..v.len()).step_by(16).find_map(|at| {
            let mask = zmm::nonzero_mask(v, at);
            (mask != 0).then(|| at + mask.trailing_zeros() as usize)
        })?;
        let last = (first..v.len()).step_by(16).rev().find_map(|at| Some(at + zmm::nonzero_mask(v, at).checked_ilog2()? as usize));
        Some((first, last.unwrap_or(first)))
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    Some((v.iter().position(|&x| is_nonzero(x))?, v.iter().rposition(|&x| is_nonzero(x))?))
}

#[inline(always)]
pub fn load<const N: usize>(s: &[f32], at: usize) -> Lanes<N> {
    let s: &[f32; N] = s[at..at + N].try_into().expect("N lanes");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if zmm::whole::<N>() {
        let mut v = Lanes::default();
        zmm::copy(&mut v.0, s);
        return v;
    }
    Lanes(*s)
}

#[inline(always)]
pub fn store<const N: usize>(s: &mut [f32], at: usize, v: Lanes<N>) {
    let s: &mut [f32; N] = (&mut s[at..at + N]).try_into().expect("N lanes");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if zmm::whole::<N>() {
        return zmm::copy(s, &v.0);
    }
    *s = v.0;
}

/// `to.copy_from_slice(from)` as inline vector moves: for the short runs of im2col (AlexNet's
/// conv1 copies 33-float window rows, 33,000 per sample), where a `memcpy` call each costs
/// more than the copy.
#[inline(always)]
pub fn copy_run(to: &mut [f32], from: &[f32]) {
    assert_eq!(to.len(), from.len(), "copy_run lengths");
    let whole = to.len() - to.len() % L;
    for at in (0..whole).step_by(L) {
        store::<L>(to, at, load::<L>(from, at));
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    zmm::copy_tail(&mut to[whole..], &from[whole..]);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    to[whole..].copy_from_slice(&from[whole..]);
}

/// `to.copy_from_slice(from)` with the whole cache lines of `to` written by non-temporal stores,
/// which do not read a line before overwriting it and leave it in memory, not the cache: for
/// an output far larger than the cache, written once (the fused conv1 + pool1's pooled rows
/// and argmax: inside the training step on an Emerald Rapids Xeon, its forward 0.91-0.92x the
/// time with ordinary stores). The partial lines at either end are stored as usual. The writing
/// thread calls `stream_fence` before others read what it wrote.
#[inline(always)]
pub fn stream_copy<T: bytemuck::Pod>(to: &mut [T], from: &[T]) {
    assert_eq!(to.len(), from.len(), "stream_copy lengths");
    let (to, from) = (bytemuck::cast_slice_mut::<T, u8>(to), bytemuck::cast_slice::<T, u8>(from));
    let head = to.as_ptr().align_offset(LINE).min(to.len());
    let body = head + (to.len() - head) / LINE * LINE;
    // A `memcpy` call for an empty end would cost more than the line (see `copy_run`).
    if head > 0 {
        to[..head].copy_from_slice(&from[..head]);
    }
    for at in (head..body).step_by(LINE) {
        stream_line((&mut to[at..at + LINE]).try_into().expect("a line"), from[at..at + LINE].try_into().expect("a line"));
    }
    if body < to.len() {
        to[body..].copy_from_slice(&from[body..]);
    }
}

/// One cache line `from` into the line `to` starts, by non-temporal stores where the target
/// has them.
#[inline(always)]
fn stream_line(to: &mut [u8; LINE], from: &[u8; LINE]) {
    debug_assert_eq!(to.as_ptr() as usize % LINE, 0, "a line's start");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    // SAFETY: `to` is 64 bytes on a 64-byte boundary (`stream_copy`), `from` 64 bytes.
    unsafe {
        use std::arch::x86_64::*;
        _mm512_stream_si512(to.as_mut_ptr().cast(), _mm512_loadu_si512(from.as_ptr().cast()));
    }
    #[cfg(all(target_arch = "x86_64", not(target_feature = "avx512f")))]
    // SAFETY: as above; each 16-byte store is on a 16-byte boundary.
    unsafe {
        use std::arch::x86_64::*;
        for k in (0..LINE).step_by(16) {
            _mm_stream_si128(to.as_mut_ptr().add(k).cast(), _mm_loadu_si128(from.as_ptr().add(k).cast()));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    to.copy_from_slice(from);
}

/// Orders this thread's `stream_copy` stores before what it writes next (the end of its part
/// of a parallel loop, which other threads then read).
#[inline(always)]
pub fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE, which `sfence` needs, is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Ask for the cache lines of `bytes` into L1 ahead of their use (a hint: no effect on what a
/// program computes), for reads the hardware prefetchers cannot foresee.
#[inline(always)]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(LINE) {
        // SAFETY: SSE, which `prefetcht0` needs, is part of x86-64; the address is in `bytes`,
        // and a prefetch neither faults nor writes.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Read one float of each cache line of `data`, in order: a sequential pass, which the hardware
/// prefetchers follow, that leaves the lines in the cache for reads in an order they do not
/// (`ConvPool::backward`'s passes over a pooled gradient a lane block at a time, which read
/// every fourth line). No effect on what a program computes.
#[inline(always)]
pub fn touch_lines(data: &[f32]) {
    const PER_LINE: usize = LINE / std::mem::size_of::<f32>();
    for line in data.chunks(PER_LINE) {
        // SAFETY: a read of an element of `data`; volatile, so that it is neither left out nor
        // merged into vector gathers.
        unsafe { std::ptr::read_volatile(line.as_ptr()) };
    }
    if let Some(last) = data.last() {
        // The last line, where `data` starts inside a line and ends past the last read.
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(last) };
    }
}

/// `permute_block(to, block, index)` of the block of `side` rows of `side` floats, row r from
/// `from[at + r * stride..]`, packed one after another, zeros after them (`side * side <= 32`):
/// a block of a padded image gathered into rows of 16 floats, with AVX-512 in registers.
#[inline(always)]
pub fn pack_columns<const M: usize>(to: &mut [[f32; 16]; M], from: &[f32], at: usize, stride: usize, side: usize, index: &[[u8; 16]; M]) {
    assert!(side * side <= 32, "a {side} x {side} block fits 32 floats");
    // Side 5 (a 3x3 pool of stride 2 over a 3x3 convolution's outputs: the seed model's
    // conv1 + pool1) as a constant, so that the row loop unrolls with its masks worked out.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        debug_assert!(index.as_flattened().iter().all(|&i| i < 32), "indices inside the block");
        match side {
            5 => zmm::pack_columns(to, from, at, stride, 5, index),
            _ => zmm::pack_columns(to, from, at, stride, side, index),
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        let mut block = [0.0; 32];
        for r in 0..side {
            block[r * side..(r + 1) * side].copy_from_slice(&from[at + r * stride..][..side]);
        }
        permute_block(to, &block, index);
    }
}

/// `group(k, registers)` over `n` lanes in registers of `lanes`: blocks of four registers from
/// lane 0 while they fit, then one register at a time (`n` a multiple of `lanes`). The register
/// blocks of the kernels that keep a whole window in registers (`window_max_arg`).
#[cfg(all(target_arch = "x86_64", any(target_feature = "avx512bw", all(target_feature = "avx2", target_feature = "fma"))))]
#[inline(always)]
fn register_groups(n: usize, lanes: usize, mut group: impl FnMut(usize, usize)) {
    let mut k = 0;
    while k + 4 * lanes <= n {
        group(k, 4);
        k += 4 * lanes;
    }
    while k < n {
        group(k, 1);
        k += lanes;
    }
}

/// The maximum, lane by lane, over a window's taps, and its argmax, into `best` and `arg`: for
/// each tap (t, i) in order, the N floats from `x[i * c + cb]`; lanes where they exceed the
/// maximum so far (a NaN never wins) take them, and their argmax becomes t. The maximum starts
/// at -inf, the argmax at the first tap's t. With `nowhere`, a maximum of 0 or less takes that
/// argmax instead. With AVX-512 or AVX2, the window's maxima and argmax in registers, stored
/// once (returned by value, through the stack, the 16-lane pool1 forward took 1.04x the time,
/// Zen 4); elsewhere lane by lane.
#[inline(always)]
pub fn window_max_arg<const N: usize>(
    x: &[f32],
    taps: &[(usize, usize)],
    c: usize,
    cb: usize,
    nowhere: Option<u8>,
    best: &mut [f32; N],
    arg: &mut [u8; N],
) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512bw", target_feature = "avx512vl"))]
    if zmm::whole::<N>() {
        return zmm::window_max_arg(x, taps, c, cb, nowhere, best, arg);
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    if ymm::whole::<N>() {
        return ymm::window_max_arg(x, taps, c, cb, nowhere, best, arg);
    }
    best.fill(f32::NEG_INFINITY);
    arg.fill(taps.first().map_or(0, |t| t.0 as u8));
    for &(tap, i) in taps {
        let x = &x[i * c + cb..][..N];
        for l in 0..N {
            // Selects as masks of bits: written as `if wins { .. } else { .. }`, LLVM kept the
            // running maxima on the stack and updated them with masked stores.
            let wins = ((x[l] > best[l]) as u32).wrapping_neg();
            best[l] = f32::from_bits((x[l].to_bits() & wins) | (best[l].to_bits() & !wins));
            arg[l] = (tap as u8 & wins as u8) | (arg[l] & !wins as u8);
        }
    }
    if let Some(nowhere) = nowhere {
        for (a, &b) in arg.iter_mut().zip(best.iter()) {
            let zeroed = ((b <= 0.0) as u8).wrapping_neg();
            *a = (nowhere & zeroed) | (*a & !zeroed);
        }
    }
}

/// `to[j][i] = block[index[j][i]]` for indices below 32: rows of 16 floats gathered from a
/// block of 32 (a pooled output's input neighbourhood, by the column of the convolution's
/// taps: `Neighbourhoods`). By permutes where AVX-512 or AVX2 has them (a load and a store per
/// float took a quarter of the seed model's conv1 backward, Zen 4), else float by float.
#[inline(always)]
pub fn permute_block<const M: usize>(to: &mut [[f32; 16]; M], block: &[f32; 32], index: &[[u8; 16]; M]) {
    debug_assert!(index.as_flattened().iter().all(|&i| i < 32), "indices inside the block");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    zmm::permute_block(to, block, index);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", not(target_feature = "avx512f")))]
    ymm::permute_block(to, block, index);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    for (to, &i) in to.as_flattened_mut().iter_mut().zip(index.as_flattened()) {
        *to = block[usize::from(i % 32)];
    }
}

#[cfg(test)]
mod tests {
    use super::{
        HAS_FMA, Lanes, copy_run, is_nonzero, nonzero_bounds, pack_columns, permute_block, stream_copy, stream_fence, window_max_arg,
    };

    /// `pack_columns` against the definition, for every block side that fits (a row across the
    /// two registers' boundary included), at the start, middle and end of the source: the
    /// block itself (the zeros after its rows too) and gathered.
    #[test]
    fn pack_columns_packs_each_row_and_zeros_the_rest() {
        let from: Vec<f32> = (0..200).map(|i| i as f32 + 0.25).collect();
        let identity: [[u8; 16]; 2] = std::array::from_fn(|j| std::array::from_fn(|i| (16 * j + i) as u8));
        let shuffled: [[u8; 16]; 2] = std::array::from_fn(|j| std::array::from_fn(|i| ((16 * j + i) * 5 % 32) as u8));
        for side in 1..=5 {
            for stride in [side, 7, 30] {
                for at in [0, 3, from.len() - (side - 1) * stride - side] {
                    let block: Vec<f32> =
                        (0..32).map(|l| if l < side * side { from[at + l / side * stride + l % side] } else { 0.0 }).collect();
                    for index in [identity, shuffled] {
                        let mut got = [[f32::NAN; 16]; 2];
                        pack_columns(&mut got, &from, at, stride, side, &index);
                        let want: Vec<f32> = index.as_flattened().iter().map(|&i| block[usize::from(i)]).collect();
                        assert_eq!(got.as_flattened(), &want[..], "side {side}, stride {stride}, at {at}, index {index:?}");
                    }
                }
            }
        }
    }

    /// `permute_block` against the definition: every index into the block at every output
    /// position, in each row (the AVX2 kernel run directly too, where the build has AVX-512).
    #[test]
    fn permute_block_gathers_each_float() {
        let block: [f32; 32] = std::array::from_fn(|i| i as f32 * 1.5 - 7.25);
        for shift in 0..32u8 {
            let index: [[u8; 16]; 3] = std::array::from_fn(|j| std::array::from_fn(|i| ((16 * j + i) as u8 * 7 + shift) % 32));
            let want: Vec<f32> = index.as_flattened().iter().map(|&i| block[usize::from(i)]).collect();
            let mut got = [[f32::NAN; 16]; 3];
            permute_block(&mut got, &block, &index);
            assert_eq!(got.as_flattened(), &want[..], "shift {shift}");
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "avx512f"))]
            {
                let mut got = [[f32::NAN; 16]; 3];
                super::ymm::permute_block(&mut got, &block, &index);
                assert_eq!(got.as_flattened(), &want[..], "AVX2 kernel, shift {shift}");
            }
        }
    }

    /// Every length from none to several lines, at every offset from a line's start: the
    /// partial ends copied as usual, the whole lines streamed, nothing outside `to` touched.
    #[test]
    fn stream_copy_copies_every_length_at_every_alignment() {
        fn check<T: bytemuck::Pod + Default + PartialEq + std::fmt::Debug>(value: impl Fn(usize) -> T, outside: T) {
            let per_line = crate::layers::aligned::LINE / size_of::<T>();
            let from: Vec<T> = (0..5 * per_line).map(&value).collect();
            for len in 0..4 * per_line + 3 {
                for offset in 0..per_line + 1 {
                    let mut to = crate::layers::aligned::AlignedBuf::<T>::zeroed(6 * per_line);
                    to.fill(outside);
                    stream_copy(&mut to[offset..offset + len], &from[1..1 + len]);
                    stream_fence();
                    for (i, v) in to.iter().enumerate() {
                        let want = if (offset..offset + len).contains(&i) { from[1 + i - offset] } else { outside };
                        assert_eq!(*v, want, "len {len}, offset {offset}, index {i}");
                    }
                }
            }
        }
        check(|i| i as f32 + 0.5, -1.0f32);
        check(|i| (i % 250) as u8, 255u8);
    }

    #[test]
    fn copy_run_copies_every_length() {
        let from: Vec<f32> = (0..100).map(|i| i as f32 + 0.5).collect();
        for len in 0..70 {
            for offset in [0, 1, 7] {
                let mut to = vec![-1.0; 80];
                copy_run(&mut to[offset..offset + len], &from[3..3 + len]);
                for (i, v) in to.iter().enumerate() {
                    let want = if (offset..offset + len).contains(&i) { from[3 + i - offset] } else { -1.0 };
                    assert_eq!(*v, want, "len {len}, offset {offset}, index {i}");
                }
            }
        }
    }

    /// `window_max_arg` at lane loops (1, 3), the AVX2 kernel (8, 24, 40) and whole zmm
    /// registers (16, 32, 64) where the build has them, and the AVX2 kernel itself at 32, 40
    /// and 64 (which AVX-512 builds otherwise run only at widths that are not multiples of
    /// 16), against the definition, lane by lane: ties and NaN keep the earlier maximum, -0
    /// does not beat 0, the first tap is the argmax where nothing beats -inf; with `nowhere`,
    /// a maximum of 0 or less (not NaN; every fifth channel has one) takes it. The taps read pixels out of their order,
    /// channels from an offset.
    #[test]
    fn window_max_arg_keeps_the_first_strict_maximum() {
        fn check<const N: usize>(ymm: bool) {
            let values = [0.5, -1.0, f32::NAN, 0.5, 2.0, -0.0, 0.0, f32::NEG_INFINITY, 3.0, -2.5, 1e-40, f32::NAN];
            let (c, cb) = (N + 5, 3);
            let taps: Vec<(usize, usize)> = (0..9).map(|t| (t + 2, (t * 5) % 9)).collect();
            // Every fifth channel only 0 or less (or NaN): maxima that `nowhere` marks.
            let x: Vec<f32> = (0..9 * c)
                .map(|i| values[(i * 7 + i / 5) % values.len()])
                .enumerate()
                .map(|(i, v)| if (i % c).is_multiple_of(5) { -v.abs() } else { v })
                .collect();
            for nowhere in [None, Some(200)] {
                let (mut best, mut arg) = ([f32::NAN; N], [99; N]);
                window_max_arg(&x, &taps, c, cb, nowhere, &mut best, &mut arg);
                #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
                if ymm {
                    (best, arg) = ([f32::NAN; N], [99; N]);
                    super::ymm::window_max_arg::<N>(&x, &taps, c, cb, nowhere, &mut best, &mut arg);
                }
                assert!(cfg!(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")) || !ymm, "AVX2 builds only");
                for (l, (got, &got_arg)) in best.iter().zip(&arg).enumerate() {
                    let (mut want, mut want_arg) = (f32::NEG_INFINITY, taps[0].0 as u8);
                    for &(t, i) in &taps {
                        if x[i * c + cb + l] > want {
                            (want, want_arg) = (x[i * c + cb + l], t as u8);
                        }
                    }
                    if let Some(nowhere) = nowhere.filter(|_| want <= 0.0) {
                        want_arg = nowhere;
                    }
                    assert_eq!((got.to_bits(), got_arg), (want.to_bits(), want_arg), "{N} lanes, lane {l}, nowhere {nowhere:?}");
                }
            }
        }
        for check in [check::<1> as fn(bool), check::<3>, check::<8>, check::<16>, check::<24>, check::<32>, check::<40>, check::<64>] {
            check(false);
        }
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        for check in [check::<8> as fn(bool), check::<32>, check::<40>, check::<64>] {
            check(true);
        }
    }

    /// `where_positive` at lane loops (8) and whole zmm registers (16, 32) against the
    /// definition: the gradient where the output is above 0, else +0 (0, -0 and NaN outputs
    /// mask; a NaN gradient passes where the output is positive).
    #[test]
    fn where_positive_masks_by_the_output() {
        fn check<const N: usize>() {
            let ys = [1.0, 0.0, -0.0, -2.0, f32::NAN, 1e-40, f32::INFINITY, -1e-40, 3.5];
            let gs = [-1.5, 2.0, f32::NAN, -0.0, 4.0, 1e-30, -7.0];
            let (y, g) = (Lanes::<N>(std::array::from_fn(|l| ys[l % ys.len()])), Lanes::<N>(std::array::from_fn(|l| gs[l % gs.len()])));
            let got = g.where_positive(y);
            for l in 0..N {
                let want = if y.0[l] > 0.0 { g.0[l] } else { 0.0 };
                assert_eq!(got.0[l].to_bits(), want.to_bits(), "{N} lanes, lane {l}");
            }
        }
        check::<8>();
        check::<16>();
        check::<32>();
    }

    /// `add_unless` against the definition at 8, 16 and 32 lanes: the skipped lanes add +0
    /// (turning a -0 sum into +0, whatever `g` holds there), the others add (NaN and
    /// infinities included).
    #[test]
    fn add_unless_skips_the_marked_lanes() {
        fn check<const N: usize>() {
            let sums = [0.0, -0.0, 1.5, f32::INFINITY, -3.25, 1e-30];
            let gs = [2.0, -0.0, f32::NAN, -1.5, 0.0, 7.0, f32::NEG_INFINITY];
            let sum = Lanes::<N>(std::array::from_fn(|l| sums[l % sums.len()]));
            let g: [f32; N] = std::array::from_fn(|l| gs[l % gs.len()]);
            let arg: [u8; N] = std::array::from_fn(|l| if l % 3 == 1 { 255 } else { l as u8 });
            let got = sum.add_unless(&g, &arg, 255);
            for l in 0..N {
                let want = sum.0[l] + if arg[l] == 255 { 0.0 } else { g[l] };
                // Bits, so that a zero's sign counts; a NaN's sign and payload are the CPU's.
                let same = got.0[l].to_bits() == want.to_bits() || (got.0[l].is_nan() && want.is_nan());
                assert!(same, "{N} lanes, lane {l}: {} vs {want}", got.0[l]);
            }
        }
        check::<8>();
        check::<16>();
        check::<32>();
    }

    /// `neighbourhood_mul_add` against the definition, a lane at a time (fused where the target
    /// has FMA): every argmax byte value (the skipped one, and ones whose low bits pick each
    /// base entry, all 16 of them, each of 0..=8 among them), every row step the contract
    /// allows, and the bits of the taps' sums and of the gradient's, at 8, 16 and 32 lanes.
    #[test]
    fn neighbourhood_mul_add_looks_each_lane_up() {
        fn check<const N: usize>() {
            let columns: [[f32; 16]; 3] = std::array::from_fn(|j| std::array::from_fn(|i| ((16 * j + i) as f32 - 21.5) * 0.37));
            let base: [u32; 16] = std::array::from_fn(|i| (i as u32 * 7) % 9);
            for (row_step, first) in (0..=3).flat_map(|r| (0..=255u8).step_by(N).map(move |f| (r, f))) {
                let arg: [u8; N] = std::array::from_fn(|l| first.wrapping_add(l as u8));
                let g: [f32; N] = std::array::from_fn(|l| 1.25 - l as f32 * 0.3);
                let mut acc: [Lanes<N>; 9] = std::array::from_fn(|t| Lanes(std::array::from_fn(|l| (t * N + l) as f32 * 0.01)));
                let (mut want, mut sum) = (acc, Lanes(std::array::from_fn(|l| l as f32 * 0.7 - 3.0)));
                let mut want_sum = sum;
                Lanes::neighbourhood_mul_add(&mut acc, &mut sum, &columns, &g, &arg, &base, row_step, 200);
                for l in 0..N {
                    let g = if arg[l] == 200 { 0.0 } else { g[l] };
                    want_sum.0[l] += g;
                    for t in 0..9 {
                        let v = columns[t % 3][t / 3 * row_step + base[usize::from(arg[l] % 16)] as usize];
                        want[t].0[l] = if HAS_FMA { g.mul_add(v, want[t].0[l]) } else { want[t].0[l] + g * v };
                    }
                }
                for t in 0..9 {
                    let (got, want) = (acc[t].0.map(f32::to_bits), want[t].0.map(f32::to_bits));
                    assert_eq!(got, want, "{N} lanes, tap {t}, row step {row_step}, argmax from {first}");
                }
                assert_eq!(sum.0.map(f32::to_bits), want_sum.0.map(f32::to_bits), "{N} lanes, the gradient's sum, argmax from {first}");
            }
        }
        check::<8>();
        check::<16>();
        check::<32>();
    }

    /// `nonzero_bounds` against a search from each end, on every length to 70 with nonzeros
    /// (NaN and denormals among them) at every pair of positions, and none.
    #[test]
    fn nonzero_bounds_finds_the_first_and_last_nonzero() {
        for len in 0..70 {
            let mut v = vec![0.0f32; len];
            v.iter_mut().step_by(3).for_each(|x| *x = -0.0);
            assert_eq!(nonzero_bounds(&v), None, "all zeros, length {len}");
            for first in 0..len {
                for last in first..len {
                    let mut v = v.clone();
                    v[first] = [1.0, f32::NAN, -1e-40][first % 3];
                    v[last] = [2.5, -3.0, f32::INFINITY][last % 3];
                    assert_eq!(nonzero_bounds(&v), Some((first, last)), "length {len}");
                }
            }
        }
    }

    #[test]
    fn is_nonzero_takes_minus_zero_for_zero() {
        assert!(!is_nonzero(0.0) && !is_nonzero(-0.0), "both zeros are zero");
        for x in [1e-40, -1e-40, -3.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE] {
            assert!(is_nonzero(x), "{x}");
        }
    }
}
