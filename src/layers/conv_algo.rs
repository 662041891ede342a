//! The algorithms a convolution can run with, and the one entry point per pass that runs the
//! chosen one. Which is fastest depends on the layer's shape and on the CPU (a kernel tuned on
//! AVX2 can be 2x off on AVX-512), so `autotune` picks per layer and per pass by measurement;
//! `ConvAlgos::heuristic` is the choice without measuring.

use super::conv::{
    Conv, direct_backward, direct_forward, direct_weight_and_bias_grad, im2col_backward, im2col_forward, relu_bias_backward,
};
use super::winograd::{self, Transforms};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgo {
    /// Loops over the window's taps with the output channels in registers.
    Direct,
    /// Patches gathered into a matrix, then one GEMM (grouped layers: one per tower).
    Im2col,
    /// Winograd F(7x7, 3x3) and F(4x4, 5x5): 3x3 and 5x5 stride-1 layers, and strided layers
    /// whose space-to-depth rewrite is one (AlexNet's conv1).
    Winograd,
}

impl ConvAlgo {
    pub const ALL: [ConvAlgo; 3] = [ConvAlgo::Direct, ConvAlgo::Im2col, ConvAlgo::Winograd];

    pub fn applies(self, conv: &Conv) -> bool {
        self != ConvAlgo::Winograd || winograd::applies(conv)
    }

    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Direct => "direct",
            ConvAlgo::Im2col => "im2col",
            ConvAlgo::Winograd => "winograd",
        }
    }
}

/// One algorithm per pass of a convolution layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvAlgos {
    pub forward: ConvAlgo,
    pub input_grad: ConvAlgo,
    pub weight_grad: ConvAlgo,
}

/// Patches shorter than this go through direct loops in the heuristic choice: a GEMM with
/// k = 9 (the seed model's single-channel conv1) spends its time packing, not multiplying.
const DIRECT_MAX_PATCH: usize = 32;

impl ConvAlgos {
    pub fn all(algo: ConvAlgo) -> ConvAlgos {
        ConvAlgos { forward: algo, input_grad: algo, weight_grad: algo }
    }

    /// The choice without measuring: Winograd where it applies, direct loops for short
    /// patches, im2col otherwise (what the AVX2 machine measured best).
    pub fn heuristic(conv: &Conv) -> ConvAlgos {
        ConvAlgos::all(if winograd::applies(conv) {
            ConvAlgo::Winograd
        } else if conv.patch_len() < DIRECT_MAX_PATCH {
            ConvAlgo::Direct
        } else {
            ConvAlgo::Im2col
        })
    }

    /// Whether a training pass needs the Winograd transforms kept (`winograd::saved_len`).
    pub fn keeps_winograd_transforms(&self) -> bool {
        [self.forward, self.input_grad, self.weight_grad].contains(&ConvAlgo::Winograd)
    }

    /// "fwd winograd, dx im2col, dw direct".
    pub fn describe(&self) -> String {
        format!("fwd {}, dx {}, dw {}", self.forward.name(), self.input_grad.name(), self.weight_grad.name())
    }
}

/// Forward over a batch: `output = relu?(conv(input, weight) + bias)`. A training pass of a
/// layer with Winograd anywhere gives `saved` (`winograd::saved_len` floats): a Winograd
/// forward fills it for backward.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    conv: &Conv,
    algo: ConvAlgo,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    output: &mut [f32],
    transforms: Transforms,
) {
    match algo {
        ConvAlgo::Direct => direct_forward(conv, batch, input, weight, bias, output),
        ConvAlgo::Im2col => im2col_forward(conv, batch, input, weight, bias, output),
        ConvAlgo::Winograd => winograd::forward(conv, batch, input, weight, bias, output, transforms),
    }
}

/// Backward over a batch: masks `d_output` in place by the ReLU (a first layer whose weight
/// gradient runs direct loops masks a copy, chunk by chunk, as it reads it, and Winograd for
/// both gradients masks as it transforms it: `d_output` is then left as it was), overwrites `d_bias`,
/// `d_weight` and (unless it is the first layer) `d_input`, each gradient with its own
/// algorithm. `saved` is what the training forward kept (layers with Winograd anywhere); when
/// forward was not Winograd, the transforms a Winograd gradient needs are made here.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    conv: &Conv,
    algos: ConvAlgos,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    output: &[f32],
    d_output: &mut [f32],
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
    d_bias: &mut [f32],
    saved: Option<&mut [f32]>,
) {
    // A first layer's direct weight gradient masks the output gradient as it reads it, and so
    // does Winograd where it makes both gradients.
    let d_weight = match (d_weight, &d_input, algos.weight_grad) {
        (Some(dw), None, ConvAlgo::Direct) => return direct_weight_and_bias_grad(conv, batch, input, output, d_output, dw, d_bias),
        (dw, ..) => dw,
    };
    let mask_and_bias = if algos.input_grad == ConvAlgo::Winograd && algos.weight_grad == ConvAlgo::Winograd {
        Some(winograd::MaskAndBias { output: conv.relu.then_some(output), d_bias })
    } else {
        relu_bias_backward(conv, batch, output, d_output, d_bias);
        None
    };
    let dy = &*d_output;
    let need_dx = d_input.is_some();
    let mut saved = saved;
    if algos.forward != ConvAlgo::Winograd {
        let want_u = need_dx && algos.input_grad == ConvAlgo::Winograd;
        let want_v = d_weight.is_some() && algos.weight_grad == ConvAlgo::Winograd;
        if want_u || want_v {
            let saved = saved.as_deref_mut().expect("a layer with a Winograd gradient keeps the transforms");
            winograd::prepare_backward(conv, batch, input, weight, saved, want_u, want_v);
        }
    }
    let saved = saved.as_deref();
    if mask_and_bias.is_some() {
        return winograd::backward(conv, batch, saved.expect("Winograd keeps its transforms"), dy, mask_and_bias, d_input, d_weight);
    }
    // One call when both gradients share an algorithm: they share its intermediates.
    if need_dx && d_weight.is_some() && algos.input_grad == algos.weight_grad {
        gradients(conv, algos.weight_grad, batch, input, weight, dy, saved, d_input, d_weight);
    } else {
        if d_weight.is_some() {
            gradients(conv, algos.weight_grad, batch, input, weight, dy, saved, None, d_weight);
        }
        if let Some(dx) = d_input {
            gradients(conv, algos.input_grad, batch, input, weight, dy, saved, Some(dx), None);
        }
    }
}

/// The input and/or weight gradient (whichever is given; overwritten) by one algorithm, from
/// the ReLU-masked `d_output`; Winograd reads its transforms from `saved`.
#[allow(clippy::too_many_arguments)]
pub fn gradients(
    conv: &Conv,
    algo: ConvAlgo,
    batch: usize,
    input: &[f32],
    weight: &[f32],
    d_output: &[f32],
    saved: Option<&[f32]>,
    d_input: Option<&mut [f32]>,
    d_weight: Option<&mut [f32]>,
) {
    match algo {
        ConvAlgo::Direct => direct_backward(conv, batch, input, weight, d_output, d_input, d_weight),
        ConvAlgo::Im2col => im2col_backward(conv, batch, input, weight, d_output, d_input, d_weight),
        ConvAlgo::Winograd => {
            winograd::backward(conv, batch, saved.expect("Winograd keeps its transforms"), d_output, None, d_input, d_weight)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::{MODEL_NAMES, architecture};
    use crate::layers::testing::random_vec;
    use crate::layers::{Padding, Window};
    use crate::model::Model;

    /// The independent reference, one element at a time (so the models' large layers can be
    /// checked at sampled positions): the output before bias and ReLU...
    fn naive_output(c: &Conv, x: &[f32], w: &[f32], n: usize, oy: usize, ox: usize, co: usize) -> f64 {
        let (cin_g, cout_g, k) = (c.in_c / c.groups, c.out_c / c.groups, c.win.kernel);
        let g = co / cout_g;
        let mut s = 0.0f64;
        for ky in 0..k {
            for kx in 0..k {
                let (Some(iy), Some(ix)) = (Window::tap(&c.win.h, c.win.stride, oy, ky), Window::tap(&c.win.w, c.win.stride, ox, kx))
                else {
                    continue;
                };
                for ci in 0..cin_g {
                    let xv = x[n * c.in_len() + (iy * c.win.w.input + ix) * c.in_c + g * cin_g + ci];
                    s += xv as f64 * w[((ky * k + kx) * cin_g + ci) * c.out_c + co] as f64;
                }
            }
        }
        s
    }

    /// ...d loss / d weight[tap][ci][co] for output gradient `dy` (already masked)...
    fn naive_weight_grad(c: &Conv, batch: usize, x: &[f32], dy: &[f32], tap: usize, ci: usize, co: usize) -> f64 {
        let (cin_g, cout_g, k) = (c.in_c / c.groups, c.out_c / c.groups, c.win.kernel);
        let (ky, kx, g) = (tap / k, tap % k, co / cout_g);
        let mut s = 0.0f64;
        for n in 0..batch {
            for oy in 0..c.win.h.output {
                let Some(iy) = Window::tap(&c.win.h, c.win.stride, oy, ky) else { continue };
                for ox in 0..c.win.w.output {
                    let Some(ix) = Window::tap(&c.win.w, c.win.stride, ox, kx) else { continue };
                    let xv = x[n * c.in_len() + (iy * c.win.w.input + ix) * c.in_c + g * cin_g + ci];
                    s += xv as f64 * dy[n * c.out_len() + (oy * c.win.w.output + ox) * c.out_c + co] as f64;
                }
            }
        }
        s
    }

    /// ...and d loss / d input[n][iy][ix][c].
    fn naive_input_grad(c: &Conv, w: &[f32], dy: &[f32], n: usize, iy: usize, ix: usize, ch: usize) -> f64 {
        let (cin_g, cout_g, k) = (c.in_c / c.groups, c.out_c / c.groups, c.win.kernel);
        let (g, ci) = (ch / cin_g, ch % cin_g);
        let mut s = 0.0f64;
        for oy in 0..c.win.h.output {
            for ox in 0..c.win.w.output {
                for ky in 0..k {
                    for kx in 0..k {
                        if Window::tap(&c.win.h, c.win.stride, oy, ky) == Some(iy)
                            && Window::tap(&c.win.w, c.win.stride, ox, kx) == Some(ix)
                        {
                            for co in g * cout_g..(g + 1) * cout_g {
                                s += w[((ky * k + kx) * cin_g + ci) * c.out_c + co] as f64
                                    * dy[n * c.out_len() + (oy * c.win.w.output + ox) * c.out_c + co] as f64;
                            }
                        }
                    }
                }
            }
        }
        s
    }

    /// How far a value may lie from the naive reference, relative to `scale`.
    const TOLERANCE: f64 = 2e-4;

    fn assert_close(what: &str, got: f32, want: f64, scale: f64) {
        assert!((got as f64 - want).abs() <= TOLERANCE * scale.max(1.0), "{what}: {got} vs {want} (scale {scale})");
    }

    /// The scale of one value `want` of a tensor that `algo` computed: the value plus one, or
    /// for Winograd, whose transforms mix a tile's values, at least `winograd::ROUNDING` of the
    /// tensor's `largest` (its rounding is relative to that, not to each value).
    fn scale_for(algo: ConvAlgo, want: f64, largest: f64) -> f64 {
        let own = 1.0 + want.abs();
        if algo == ConvAlgo::Winograd { own.max(winograd::ROUNDING as f64 / TOLERANCE * largest) } else { own }
    }

    /// The largest magnitude in `values`.
    fn largest(values: &[f64]) -> f64 {
        values.iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    /// Every algorithm on one layer: all three passes, with each gradient both on its own and
    /// paired with the other, against the naive reference at `samples` positions per tensor.
    fn check_every_algorithm(c: &Conv, batch: usize, samples: usize) {
        let x = random_vec(batch * c.in_len(), 1);
        let w = random_vec(c.weight_len(), 2);
        let b = random_vec(c.out_c, 3);
        let r = random_vec(batch * c.out_len(), 4);
        let mut pick = {
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            move |n: usize| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (state >> 33) as usize % n
            }
        };
        let positions: Vec<(usize, usize, usize, usize)> =
            (0..samples).map(|_| (pick(batch), pick(c.win.h.output), pick(c.win.w.output), pick(c.out_c))).collect();
        let taps: Vec<(usize, usize, usize)> =
            (0..samples).map(|_| (pick(c.win.kernel * c.win.kernel), pick(c.in_c / c.groups), pick(c.out_c))).collect();
        let pixels: Vec<(usize, usize, usize, usize)> =
            (0..samples).map(|_| (pick(batch), pick(c.win.h.input), pick(c.win.w.input), pick(c.in_c))).collect();
        let saved_len = if winograd::applies(c) { winograd::saved_len(c, batch) } else { 0 };
        // The masked output gradient, from one forward output shared by every backward below
        // (so no algorithm sees a ReLU flip another's rounding caused), and the naive values.
        let mut y_ref = vec![0.0; batch * c.out_len()];
        forward(c, ConvAlgo::Im2col, batch, &x, &w, &b, &mut y_ref, Transforms::Discard);
        let (mut dy, mut db) = (r.clone(), vec![0.0; c.out_c]);
        relu_bias_backward(c, batch, &y_ref, &mut dy, &mut db);
        for co in 0..c.out_c {
            let want: f64 = dy.chunks(c.out_c).map(|row| row[co] as f64).sum();
            assert_close("bias gradient", db[co], want, 1.0);
        }
        let want_dw: Vec<f64> = taps.iter().map(|&(tap, ci, co)| naive_weight_grad(c, batch, &x, &dy, tap, ci, co)).collect();
        let want_dx: Vec<f64> = pixels.iter().map(|&(n, iy, ix, ch)| naive_input_grad(c, &w, &dy, n, iy, ix, ch)).collect();
        let want_y: Vec<f64> = positions
            .iter()
            .map(|&(n, oy, ox, co)| {
                let y = naive_output(c, &x, &w, n, oy, ox, co) + b[co] as f64;
                if c.relu { y.max(0.0) } else { y }
            })
            .collect();
        let (largest_y, largest_dw, largest_dx) = (largest(&want_y), largest(&want_dw), largest(&want_dx));
        for fwd in ConvAlgo::ALL.into_iter().filter(|a| a.applies(c)) {
            let mut y = vec![0.0; batch * c.out_len()];
            let mut saved = vec![0.0; saved_len];
            let transforms = if saved_len > 0 { Transforms::Keep(&mut saved) } else { Transforms::Discard };
            forward(c, fwd, batch, &x, &w, &b, &mut y, transforms);
            for (&(n, oy, ox, co), &want) in positions.iter().zip(&want_y) {
                let got = y[n * c.out_len() + (oy * c.win.w.output + ox) * c.out_c + co];
                assert_close(&format!("{} forward {c:?}", fwd.name()), got, want, scale_for(fwd, want, largest_y));
            }
            for (dx_algo, dw_algo) in ConvAlgo::ALL.iter().flat_map(|&a| ConvAlgo::ALL.map(move |b| (a, b))) {
                if !dx_algo.applies(c) || !dw_algo.applies(c) {
                    continue;
                }
                let algos = ConvAlgos { forward: fwd, input_grad: dx_algo, weight_grad: dw_algo };
                // Backward asked for the input gradient, the weight gradient or both.
                let run = |want_dx: bool, want_dw: bool| {
                    let (mut dx, mut dw, mut db) = (vec![f32::NAN; x.len()], vec![f32::NAN; w.len()], vec![f32::NAN; c.out_c]);
                    let (mut d_out, mut saved) = (r.clone(), saved.clone());
                    let (dx_arg, dw_arg) = (want_dx.then_some(&mut dx[..]), want_dw.then_some(&mut dw[..]));
                    backward(c, algos, batch, &x, &w, &y_ref, &mut d_out, dx_arg, dw_arg, &mut db, (saved_len > 0).then_some(&mut saved));
                    (dx, dw, db)
                };
                let (dx, dw, db_both) = run(true, true);
                for co in 0..c.out_c {
                    assert_close(&format!("{} bias gradient {c:?}", algos.describe()), db_both[co], db[co] as f64, 1.0);
                }
                for (&(tap, ci, co), &want) in taps.iter().zip(&want_dw) {
                    let got = dw[(tap * (c.in_c / c.groups) + ci) * c.out_c + co];
                    assert_close(&format!("{} dw {c:?}", algos.describe()), got, want, scale_for(dw_algo, want, largest_dw));
                }
                for (&(n, iy, ix, ch), &want) in pixels.iter().zip(&want_dx) {
                    let got = dx[n * c.in_len() + (iy * c.win.w.input + ix) * c.in_c + ch];
                    assert_close(&format!("{} dx {c:?}", algos.describe()), got, want, scale_for(dx_algo, want, largest_dx));
                }
                let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
                // Without an input gradient (the first layer), the weight and bias gradients are
                // the same (direct loops then mask the output gradient as they read it: the same
                // sums in the same order, so the same bits); without a weight gradient (a frozen
                // layer), the input gradient is.
                let (_, dw_alone, db_alone) = run(false, true);
                assert!(close(&dw_alone, &dw), "{}", algos.describe());
                assert_eq!(db_alone, db_both, "{}: bias gradient without the input gradient", algos.describe());
                if dw_algo == ConvAlgo::Direct && dx_algo == ConvAlgo::Direct {
                    assert_eq!(dw_alone, dw, "{}: direct weight gradient without the input gradient", algos.describe());
                }
                assert!(close(&run(true, false).0, &dx), "{}", algos.describe());
            }
        }
    }

    /// Small shapes for every geometry the engine supports (odd sizes, stride, groups, every
    /// padding, 1 input channel): quick enough for debug builds.
    #[test]
    fn every_algorithm_matches_the_naive_reference_on_small_shapes() {
        let mk = |h, w, k, s, p, in_c, out_c, groups, relu| Conv { win: Window::new(h, w, k, s, p).unwrap(), in_c, out_c, groups, relu };
        for (c, batch) in [
            (mk(6, 5, 3, 1, Padding::Same, 3, 4, 1, true), 2),
            (mk(28, 28, 3, 1, Padding::Same, 1, 4, 1, true), 3),
            (mk(6, 7, 3, 2, Padding::Same, 2, 4, 2, true), 2),
            (mk(6, 5, 3, 1, Padding::Same, 8, 5, 1, true), 2),
            (mk(9, 9, 3, 2, Padding::Same, 8, 6, 2, false), 2),
            (mk(9, 8, 5, 2, Padding::Valid, 4, 6, 2, true), 2),
            (mk(5, 6, 3, 1, Padding::Explicit(1), 4, 4, 2, false), 1),
            // Winograd: tile-aligned and ragged sizes, with and without ReLU.
            (mk(8, 8, 3, 1, Padding::Same, 16, 16, 1, false), 2),
            (mk(14, 14, 3, 1, Padding::Same, 16, 32, 1, true), 3),
            (mk(7, 7, 3, 1, Padding::Same, 32, 16, 1, true), 5),
            (mk(5, 9, 3, 1, Padding::Explicit(1), 16, 48, 1, false), 1),
            (mk(9, 9, 5, 1, Padding::Same, 16, 32, 1, true), 2),
            (mk(5, 7, 5, 1, Padding::Explicit(2), 32, 16, 1, false), 1),
            (mk(7, 6, 3, 1, Padding::Same, 16, 32, 2, true), 2),
            (mk(9, 8, 5, 1, Padding::Same, 32, 16, 2, true), 2),
            // Winograd without padding, and on strided layers' space-to-depth rewrites
            // (AlexNet's conv1 geometry: 3x3 blocks of 4x4 pixels; a padded one; 5x5 blocks).
            (mk(9, 10, 3, 1, Padding::Valid, 16, 16, 1, true), 2),
            (mk(10, 9, 5, 1, Padding::Valid, 8, 16, 1, false), 2),
            (mk(31, 27, 11, 4, Padding::Valid, 3, 32, 1, true), 2),
            (mk(21, 20, 5, 2, Padding::Explicit(2), 4, 16, 1, false), 2),
            (mk(23, 22, 9, 2, Padding::Valid, 2, 16, 1, true), 1),
        ] {
            check_every_algorithm(&c, batch, 64);
        }
    }

    /// Every convolution of every model, with every algorithm that applies to it. Minutes in a
    /// debug build (the 227x227 layers by direct loops), seconds in release.
    #[test]
    #[cfg_attr(debug_assertions, ignore = "release only: the full-size layers take minutes unoptimised")]
    fn every_algorithm_matches_the_naive_reference_on_every_model_layer() {
        for name in MODEL_NAMES {
            let model = Model::new(&architecture(name, None).unwrap()).unwrap();
            for layer in &model.layers {
                if let Some(conv) = layer.conv() {
                    check_every_algorithm(conv, 2, 24);
                }
            }
        }
    }
}
