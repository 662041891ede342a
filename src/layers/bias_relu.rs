//! The bias add and fused ReLU that end every convolution and fully connected layer, and their
//! backward: the ReLU's mask on the output gradient and the bias gradient.

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
/// contribution of these rows added into `d_bias`.
pub fn relu_mask_bias_grad(out: &[f32], d_out: &mut [f32], d_bias: &mut [f32], relu: bool) {
    let c = d_bias.len();
    if relu {
        // A bit mask rather than a select: LLVM turns `if y > 0 { dy } else { 0 }` into a
        // masked store, which is microcoded and slow on AMD.
        for (y, dy) in out.iter().zip(d_out.iter_mut()) {
            let keep = if *y > 0.0 { u32::MAX } else { 0 };
            *dy = f32::from_bits(dy.to_bits() & keep);
        }
    }
    for dy in d_out.chunks_exact(c) {
        for (db, dy) in d_bias.iter_mut().zip(dy) {
            *db += dy;
        }
    }
}
