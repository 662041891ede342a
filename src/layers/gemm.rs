//! Safe front door to the `gemm` crate for row-major matrices.
//!
//! Every GEMM in the engine goes through `matmul`, which checks that the slices cover the
//! strided ranges it is about to read or write; the unsafe call is confined here.

use gemm::Parallelism;
use rayon::prelude::*;

/// A row-major matrix operand: `rows x cols` logical, stored with leading dimension `ld`,
/// read transposed when `transposed` (then the storage is `cols x rows`).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    pub fn new(data: &'a [f32], ld: usize) -> Self {
        Operand { data, ld, transposed: false }
    }
    pub fn t(data: &'a [f32], ld: usize) -> Self {
        Operand { data, ld, transposed: true }
    }
    /// (row stride, column stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.transposed { (1, self.ld as isize) } else { (self.ld as isize, 1) }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        let (sr, sc) = if self.transposed { (cols, rows) } else { (rows, cols) };
        if sr > 0 && sc > 0 {
            assert!(sc <= self.ld, "{what}: leading dimension {} < {sc}", self.ld);
            assert!((sr - 1) * self.ld + sc <= self.data.len(), "{what}: slice too short");
        }
    }
}

/// `c[m x n] (leading dim ldc) = (accumulate ? c : 0) + a[m x k] * b[k x n]`, single-threaded:
/// callers parallelise at a coarser grain (over samples or column blocks).
pub fn matmul(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], ldc: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= ldc && (m - 1) * ldc + n <= c.len(), "dst slice too short");
    // SAFETY: the assertion covers every element the GEMM writes, and `c` is borrowed mutably.
    unsafe { matmul_raw(m, n, k, a, b, c.as_mut_ptr(), ldc, accumulate) }
}

/// # Safety
/// `c` must be valid for writes at `i * ldc + j` for all i < m, j < n, with no other live
/// reference to those elements.
unsafe fn matmul_raw(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: *mut f32, ldc: usize, accumulate: bool) {
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i's first n elements are in the caller's guaranteed range.
                unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0) };
            }
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    // SAFETY: `check` keeps the operands' strided reads inside their slices; the caller
    // guarantees the destination range.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `matmul` split over column blocks of the output across the rayon pool. Used for the fully
/// connected layers, whose row count (the batch) is too small to split: each thread reads only
/// its share of the weight matrix, so the 16 MB of fc1 are streamed once per GEMM, not per thread.
pub fn matmul_par_cols(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], ldc: usize, accumulate: bool) {
    matmul_par_cols_all(n, vec![Product { m, k, a, b, c, ldc, accumulate }]);
}

/// One product for `matmul_par_cols_all`: `c[m x n] = (accumulate ? c : 0) + a[m x k] * b[k x n]`.
pub struct Product<'a> {
    pub m: usize,
    pub k: usize,
    pub a: Operand<'a>,
    pub b: Operand<'a>,
    pub c: &'a mut [f32],
    pub ldc: usize,
    pub accumulate: bool,
}

/// Below this many flops a split costs more than it saves: the seed model's fc3 backward
/// (1024 -> 10, two products of 1.3 MFLOP at batch 64) took 0.11-0.18 ms split over two Zen 4
/// threads and takes 0.06-0.08 on one (6 alternating pairs inside the training step).
const SERIAL_FLOP: usize = 8_000_000;

/// Products with the same number of output columns `n`, split over the same column blocks
/// across the rayon pool in one parallel region: each thread computes its block of every
/// product, in the order given (a fully connected layer's input and weight gradients, which
/// both read its block of the layer's columns).
pub fn matmul_par_cols_all(n: usize, products: Vec<Product>) {
    let threads = rayon::current_num_threads();
    // Blocks are multiples of 16 columns so every block keeps full SIMD panels.
    let block = n.div_ceil(threads).div_ceil(16) * 16;
    let flop = 2 * n * products.iter().map(|p| p.m * p.k).sum::<usize>();
    if threads == 1 || n <= 16 || block >= n || flop < SERIAL_FLOP {
        for p in products {
            matmul(p.m, n, p.k, p.a, p.b, p.c, p.ldc, p.accumulate);
        }
        return;
    }
    let jobs: Vec<_> = products
        .into_iter()
        .filter(|p| p.m > 0)
        .map(|p| {
            assert!(n <= p.ldc && (p.m - 1) * p.ldc + n <= p.c.len(), "dst slice too short");
            (p.m, p.k, p.a, p.b, SendPtr(p.c.as_mut_ptr()), p.ldc, p.accumulate)
        })
        .collect();
    (0..n.div_ceil(block)).into_par_iter().for_each(|blk| {
        let j0 = blk * block;
        let nb = block.min(n - j0);
        for &(m, k, a, b, c, ldc, accumulate) in &jobs {
            let b_sub = if b.transposed { Operand { data: &b.data[j0 * b.ld..], ..b } } else { Operand { data: &b.data[j0..], ..b } };
            // SAFETY: the assertion above covers all of each c's m x n block; blocks write the
            // disjoint column ranges [j0, j0 + nb), and no slice of any `c` is alive meanwhile.
            unsafe { matmul_raw(m, nb, k, a, b_sub, c.get().add(j0), ldc, accumulate) };
        }
    });
}

/// `matmul` split over row blocks of the output across the rayon pool (blocks of whole
/// 16-row panels): for a tall `a` whose rows each thread streams once, like a fully connected
/// layer's weights in `y^T = W x^T`.
pub fn matmul_par_rows(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], ldc: usize, accumulate: bool) {
    let threads = rayon::current_num_threads();
    let block = m.div_ceil(threads).div_ceil(16) * 16;
    if threads == 1 || block >= m || a.transposed || n == 0 {
        return matmul(m, n, k, a, b, c, ldc, accumulate);
    }
    c[..(m - 1) * ldc + n].par_chunks_mut(block * ldc).enumerate().for_each(|(i, c_block)| {
        let rows = block.min(m - i * block);
        let a_block = Operand { data: &a.data[i * block * a.ld..], ..a };
        matmul(rows, n, k, a_block, b, c_block, ldc, accumulate);
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint column blocks to pool threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &dyn Fn(usize, usize) -> f32, b: &dyn Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_for_all_transpositions() {
        // The second shape is large enough (16.6 MFLOP for the two products) that
        // `matmul_par_cols_all` splits it across the pool rather than running it serially.
        for (m, n, k) in [(7, 37, 5), (40, 520, 200)] {
            check_shape(m, n, k);
        }
    }

    fn check_shape(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let ae = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
            let be = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
            let want = naive(m, n, k, &ae, &be);
            let opa = Operand { data: &a, ld: lda, transposed: ta };
            let opb = Operand { data: &b, ld: ldb, transposed: tb };
            let mut c = vec![1.0; m * n];
            matmul(m, n, k, opa, opb, &mut c, n, false);
            let mut c2 = vec![1.0; m * n];
            matmul_par_cols(m, n, k, opa, opb, &mut c2, n, true);
            let mut c3 = vec![2.0; m * n];
            matmul_par_rows(m, n, k, opa, opb, &mut c3, n, true);
            // Two products over the same columns, the second accumulating.
            let (mut c4, mut c5) = (vec![1.0; m * n], vec![3.0; m * n]);
            matmul_par_cols_all(
                n,
                vec![
                    Product { m, k, a: opa, b: opb, c: &mut c4, ldc: n, accumulate: false },
                    Product { m, k, a: opa, b: opb, c: &mut c5, ldc: n, accumulate: true },
                ],
            );
            for i in 0..m * n {
                let close = |got: f32, want: f32| (got - want).abs() < 1e-5 * (1.0 + want.abs()) * k as f32;
                assert!(close(c[i], want[i]), "{m} x {n} x {k}");
                assert!(close(c2[i] - 1.0, want[i]));
                assert!(close(c3[i] - 2.0, want[i]));
                assert!(close(c4[i], want[i]) && close(c5[i] - 3.0, want[i]));
            }
        }
    }
}
