//! The paper's data augmentation (section 4.1) on HWC f32 images: random crops with horizontal
//! reflection, PCA colour noise, and ten-crop evaluation (four corners and the centre, and
//! their reflections).

/// Copy the `size`x`size` window at (`top`, `left`) of `src` (`h`x`w`x`c`) into `dst`,
/// mirrored left-right if `flip`.
#[allow(clippy::too_many_arguments)]
pub fn crop(src: &[f32], h: usize, w: usize, c: usize, top: usize, left: usize, size: usize, flip: bool, dst: &mut [f32]) {
    assert!(top + size <= h && left + size <= w, "crop {size} at ({top}, {left}) outside {h}x{w}");
    for y in 0..size {
        let row = &src[((top + y) * w + left) * c..((top + y) * w + left + size) * c];
        let out = &mut dst[y * size * c..(y + 1) * size * c];
        if flip {
            for (x, px) in row.chunks_exact(c).enumerate() {
                out[(size - 1 - x) * c..(size - x) * c].copy_from_slice(px);
            }
        } else {
            out.copy_from_slice(row);
        }
    }
}

/// The ten evaluation crops of a `h`x`w` image: (top, left, flip) for the four corners, the
/// centre, then the same five reflected.
pub fn ten_crop_offsets(h: usize, w: usize, size: usize) -> [(usize, usize, bool); 10] {
    let (bottom, right) = (h - size, w - size);
    let five = [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom / 2, right / 2)];
    std::array::from_fn(|i| (five[i % 5].0, five[i % 5].1, i >= 5))
}

/// Principal components of RGB colour: eigenvalues (descending) and unit eigenvectors (one
/// per row) of the 3x3 covariance of all pixels.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ColourPca {
    pub eigenvalues: [f32; 3],
    pub eigenvectors: [[f32; 3]; 3],
}

/// Running sums for the RGB covariance, so it can be accumulated image by image.
#[derive(Clone, Debug, Default)]
pub struct RgbMoments {
    n: f64,
    sum: [f64; 3],
    outer: [[f64; 3]; 3],
}

impl RgbMoments {
    /// Add the pixels of an HWC RGB image.
    pub fn add(&mut self, rgb: &[f32]) {
        for px in rgb.chunks_exact(3) {
            self.n += 1.0;
            for i in 0..3 {
                self.sum[i] += px[i] as f64;
                for j in 0..3 {
                    self.outer[i][j] += px[i] as f64 * px[j] as f64;
                }
            }
        }
    }

    /// Fold in the sums of another part of the data.
    pub fn merge(&mut self, other: &RgbMoments) {
        self.n += other.n;
        for i in 0..3 {
            self.sum[i] += other.sum[i];
            for j in 0..3 {
                self.outer[i][j] += other.outer[i][j];
            }
        }
    }

    /// The (population) covariance matrix.
    pub fn covariance(&self) -> [[f64; 3]; 3] {
        let mean = self.sum.map(|s| s / self.n);
        std::array::from_fn(|i| std::array::from_fn(|j| self.outer[i][j] / self.n - mean[i] * mean[j]))
    }

    pub fn pca(&self) -> ColourPca {
        let (values, vectors) = symmetric_eigen(self.covariance());
        ColourPca { eigenvalues: values.map(|v| v as f32), eigenvectors: vectors.map(|r| r.map(|v| v as f32)) }
    }
}

/// Eigenvalues (descending) and eigenvectors (rows) of a symmetric 3x3 matrix, by cyclic Jacobi
/// rotations: exact to rounding for a matrix this small, and no linear-algebra crate needed.
pub fn symmetric_eigen(mut a: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _sweep in 0..50 {
        let off: f64 = (0..3).flat_map(|i| (0..3).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i][j] * a[i][j]).sum();
        if off < 1e-30 {
            break;
        }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            if a[p][q].abs() < 1e-300 {
                continue;
            }
            // Rotate in the (p, q) plane to zero a[p][q] (Golub & Van Loan, algorithm 8.4.1).
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
            let t = if theta == 0.0 { 1.0 } else { t };
            let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
            for row in &mut a {
                let (akp, akq) = (row[p], row[q]);
                row[p] = c * akp - s * akq;
                row[q] = s * akp + c * akq;
            }
            let (rp, rq) = (a[p], a[q]);
            a[p] = std::array::from_fn(|k| c * rp[k] - s * rq[k]);
            a[q] = std::array::from_fn(|k| s * rp[k] + c * rq[k]);
            for row in &mut v {
                let (vp, vq) = (row[p], row[q]);
                row[p] = c * vp - s * vq;
                row[q] = s * vp + c * vq;
            }
        }
    }
    // Columns of `v` are the eigenvectors; return them as rows, by descending eigenvalue.
    let mut order = [0, 1, 2];
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    (order.map(|i| a[i][i]), order.map(|i| [v[0][i], v[1][i], v[2][i]]))
}

impl ColourPca {
    /// The paper's colour shift for one image: `sum_i alpha_i * lambda_i * p_i`, to be added
    /// to every pixel, with `alphas` drawn from N(0, 0.1) once per image per epoch.
    pub fn shift(&self, alphas: [f32; 3]) -> [f32; 3] {
        std::array::from_fn(|ch| (0..3).map(|i| alphas[i] * self.eigenvalues[i] * self.eigenvectors[i][ch]).sum())
    }
}

/// Add a per-channel shift to every pixel of an HWC RGB image.
pub fn add_colour(rgb: &mut [f32], shift: [f32; 3]) {
    for px in rgb.chunks_exact_mut(3) {
        px.iter_mut().zip(shift).for_each(|(v, s)| *v += s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_hand_worked_eigenpairs() {
        // [[2,1,0],[1,2,0],[0,0,5]]: eigenvalues 5, 3, 1 with vectors e3, (1,1,0)/sqrt2, (1,-1,0)/sqrt2.
        let (values, vectors) = symmetric_eigen([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(values[0], 5.0) && close(values[1], 3.0) && close(values[2], 1.0), "{values:?}");
        let r = std::f64::consts::FRAC_1_SQRT_2;
        let want = [[0.0, 0.0, 1.0], [r, r, 0.0], [r, -r, 0.0]];
        for (got, want) in vectors.iter().zip(want) {
            // An eigenvector's sign is arbitrary.
            let sign = if got.iter().zip(want).map(|(g, w)| g * w).sum::<f64>() < 0.0 { -1.0 } else { 1.0 };
            assert!(got.iter().zip(want).all(|(g, w)| close(sign * g, w)), "{vectors:?}");
        }
    }

    #[test]
    fn rgb_covariance_and_pca_by_hand() {
        // Pixels (0,0,0), (2,2,0), (0,0,2), (2,2,2): R and G equal, B independent.
        // Means 1, 1, 1; var R = var G = var B = 1; cov(R,G) = 1; cov(R,B) = cov(G,B) = 0.
        let mut m = RgbMoments::default();
        m.add(&[0.0, 0.0, 0.0, 2.0, 2.0, 0.0]);
        m.add(&[0.0, 0.0, 2.0, 2.0, 2.0, 2.0]);
        assert_eq!(m.covariance(), [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
        // Eigenvalues 2 (along (1,1,0)/sqrt2), 1 (blue), 0 (along (1,-1,0)/sqrt2).
        let pca = m.pca();
        assert!((pca.eigenvalues[0] - 2.0).abs() < 1e-6 && (pca.eigenvalues[1] - 1.0).abs() < 1e-6 && pca.eigenvalues[2].abs() < 1e-6);
        // The shift for alphas (0.1, -0.2, 5): 0.1*2*(1,1,0)/sqrt2 - 0.2*1*(0,0,1) + 5*0*... .
        let s = pca.shift([0.1, -0.2, 5.0]);
        let sign0 = pca.eigenvectors[0][0].signum();
        let sign1 = pca.eigenvectors[1][2].signum();
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let want = [sign0 * 0.2 * r, sign0 * 0.2 * r, -0.2 * sign1];
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{s:?} vs {want:?}");
        let mut img = vec![1.0; 6];
        add_colour(&mut img, [0.5, -1.0, 0.25]);
        assert_eq!(img, [1.5, 0.0, 1.25, 1.5, 0.0, 1.25]);
    }

    #[test]
    fn crops_flips_and_ten_crop_positions() {
        // A 3x4 two-channel image whose pixel (y, x) holds (10y + x, -(10y + x)).
        let (h, w, c) = (3, 4, 2);
        let src: Vec<f32> = (0..h * w).flat_map(|i| [(10 * (i / w) + i % w) as f32, -((10 * (i / w) + i % w) as f32)]).collect();
        let mut dst = vec![0.0; 2 * 2 * c];
        crop(&src, h, w, c, 1, 2, 2, false, &mut dst);
        assert_eq!(dst, [12.0, -12.0, 13.0, -13.0, 22.0, -22.0, 23.0, -23.0]);
        crop(&src, h, w, c, 1, 2, 2, true, &mut dst);
        assert_eq!(dst, [13.0, -13.0, 12.0, -12.0, 23.0, -23.0, 22.0, -22.0]);
        // 256 -> 227: corners at 0 and 29, the centre at 14; the last five are reflected.
        let t = ten_crop_offsets(256, 256, 227);
        assert_eq!(t[..5], [(0, 0, false), (0, 29, false), (29, 0, false), (29, 29, false), (14, 14, false)]);
        assert!(t[5..].iter().zip(&t[..5]).all(|(a, b)| (a.0, a.1, a.2) == (b.0, b.1, true)));
    }
}
