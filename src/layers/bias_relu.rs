//! The bias add and fused ReLU that end every convolution and fully connected layer, and their
//! backward: the ReLU's mask on the output gradient and the bias gradient.

use super::simd::relu_mask;

/// Add the bias and apply ReLU (if fused) to `rows` output rows of `out_c` channels.
pub fn bias_relu(out: &mut [f32], bias: &[f32], relu: bool) {
    for row in out.chunks_exact_mut(bias.len()) {
        for (y, b) in row.iter_mut().zip(bias) {
            *y += b;
            if relu {
                *y = y.max(0.0);
            }
        }
    }
}

/// Zero the output gradient where the fused ReLU was inactive, then return the bias gradient
/// contribution of these rows added into `d_bias`. One pass, row by row, so each row is summed
/// while it is in cache (the rows in order, as two passes would add them: the same bits).
pub fn relu_mask_bias_grad(out: &[f32], d_out: &mut [f32], d_bias: &mut [f32], relu: bool) {
    let c = d_bias.len();
    for (y, dy) in out.chunks_exact(c).zip(d_out.chunks_exact_mut(c)) {
        if relu {
            for (y, dy) in y.iter().zip(dy.iter_mut()) {
                *dy = relu_mask(*dy, *y);
            }
        }
        for (db, dy) in d_bias.iter_mut().zip(dy.iter()) {
            *db += dy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::random_vec;

    /// Against the definitions, element by element: the masked gradient is dy where y > 0 and
    /// 0 elsewhere (dy unchanged without the ReLU), the bias gradient each channel's sum over
    /// the rows (in f64: the f32 sums are within rounding).
    #[test]
    fn the_mask_and_the_bias_gradient_match_their_definitions() {
        let (rows, c) = (37, 24);
        let y = random_vec(rows * c, 1);
        let dy = random_vec(rows * c, 2);
        for relu in [true, false] {
            let (mut masked, mut db) = (dy.clone(), vec![0.5; c]);
            relu_mask_bias_grad(&y, &mut masked, &mut db, relu);
            for (i, (&m, (&g, &v))) in masked.iter().zip(dy.iter().zip(&y)).enumerate() {
                assert_eq!(m, if relu && v <= 0.0 { 0.0 } else { g }, "row {} channel {}", i / c, i % c);
            }
            for (ch, &got) in db.iter().enumerate() {
                let want = 0.5 + (0..rows).map(|r| masked[r * c + ch] as f64).sum::<f64>();
                assert!((got as f64 - want).abs() < 1e-5, "channel {ch}: {got} vs {want}");
            }
        }
    }
}
