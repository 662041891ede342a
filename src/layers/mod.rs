//! The layers of the engine. Each is a pair of plain functions, `*_forward` and `*_backward`,
//! over caller-owned f32 buffers in NHWC layout (channels innermost, so the per-pixel channel
//! vectors that pooling, LRN and im2col touch are contiguous).

pub mod aligned;
pub mod bias_relu;
pub mod conv;
pub mod conv_algo;
pub mod conv_pool;
mod direct_conv;
pub mod gemm;
pub mod layer;
pub mod scratch;
pub mod simd;
pub mod softmax;
pub mod space_to_depth;
pub mod winograd;

#[cfg(test)]
pub(crate) mod testing;

use serde::{Deserialize, Serialize};

/// Declares the layer kinds' modules and `LayerSpec`, the serialised form of a layer in an
/// architecture (`{"Conv": {...}}`), with one variant per kind.
macro_rules! layer_kinds {
    ($($variant:ident => $module:ident::$spec:ident,)*) => {
        $(pub mod $module;)*

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub enum LayerSpec {
            $($variant($module::$spec),)*
        }

        impl LayerSpec {
            /// The layer this spec makes for an input of `input` (height, width, channels).
            pub fn resolve(&self, input: [usize; 3]) -> anyhow::Result<std::sync::Arc<dyn layer::Layer>> {
                match self {
                    $(LayerSpec::$variant(spec) => layer::Spec::resolve(spec, input),)*
                }
            }
        }
    };
}

// The layer kinds: adding one is a file defining its spec and `Layer`, and a line here.
layer_kinds! {
    Conv => convolution::ConvSpec,
    MaxPool => pool::MaxPoolSpec,
    Lrn => lrn::LrnParams,
    Dropout => dropout::DropoutSpec,
    Linear => linear::LinearSpec,
    AdaptiveAvgPool => adaptive_avg_pool::AdaptiveAvgPoolSpec,
}

/// How a sliding window is padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Padding {
    /// No padding: only windows that fit entirely.
    Valid,
    /// TensorFlow SAME: `out = ceil(in / stride)`, total padding split with the extra row or
    /// column at the end (bottom/right), as `tf.nn.conv2d` and `tf.nn.max_pool` do.
    Same,
    /// Symmetric explicit padding, as PyTorch's `padding=p`.
    Explicit(usize),
}

/// Resolved geometry of one spatial axis: output size and padding before the first element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Axis {
    pub input: usize,
    pub output: usize,
    pub pad_before: usize,
}

impl Padding {
    /// Output size and leading pad for one axis, or `None` if the window does not fit.
    pub fn resolve(self, input: usize, kernel: usize, stride: usize) -> Option<Axis> {
        // Geometry can come from a model file: keep every product below overflow.
        const MAX: usize = 1 << 24;
        if input == 0 || kernel == 0 || stride == 0 || input > MAX || kernel > MAX || stride > MAX {
            return None;
        }
        if let Padding::Explicit(p) = self
            && p > MAX
        {
            return None;
        }
        let (output, pad_before) = match self {
            Padding::Valid => {
                if input < kernel {
                    return None;
                }
                ((input - kernel) / stride + 1, 0)
            }
            Padding::Same => {
                let output = input.div_ceil(stride);
                let total = ((output - 1) * stride + kernel).saturating_sub(input);
                (output, total / 2)
            }
            Padding::Explicit(p) => {
                if input + 2 * p < kernel {
                    return None;
                }
                ((input + 2 * p - kernel) / stride + 1, p)
            }
        };
        Some(Axis { input, output, pad_before })
    }
}

/// Spatial geometry of a windowed layer (convolution or pooling) over NHWC tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub h: Axis,
    pub w: Axis,
    pub kernel: usize,
    pub stride: usize,
}

impl Window {
    pub fn new(in_h: usize, in_w: usize, kernel: usize, stride: usize, padding: Padding) -> Option<Window> {
        Some(Window { h: padding.resolve(in_h, kernel, stride)?, w: padding.resolve(in_w, kernel, stride)?, kernel, stride })
    }
    pub fn in_pixels(&self) -> usize {
        self.h.input * self.w.input
    }
    pub fn out_pixels(&self) -> usize {
        self.h.output * self.w.output
    }
    /// Input coordinate of kernel tap `k` for output coordinate `o`, if it lies inside the input.
    #[inline]
    pub fn tap(axis: &Axis, stride: usize, o: usize, k: usize) -> Option<usize> {
        (o * stride + k).checked_sub(axis.pad_before).filter(|&i| i < axis.input)
    }

    /// For each output pixel, call `f(output pixel, taps)` with the (tap index ky*k+kx, input
    /// pixel) pairs of its window that lie inside the input (padding contributes nothing).
    #[inline(always)]
    pub fn for_each_window(&self, mut f: impl FnMut(usize, &[(usize, usize)])) {
        let k = self.kernel;
        let mut taps = Vec::with_capacity(k * k);
        for oy in 0..self.h.output {
            for ox in 0..self.w.output {
                taps.clear();
                for ky in 0..k {
                    let Some(iy) = Window::tap(&self.h, self.stride, oy, ky) else { continue };
                    for kx in 0..k {
                        let Some(ix) = Window::tap(&self.w, self.stride, ox, kx) else { continue };
                        taps.push((ky * k + kx, iy * self.w.input + ix));
                    }
                }
                f(oy * self.w.output + ox, &taps);
            }
        }
    }

    /// For each output coordinate along `axis` (`self.h` or `self.w`), the input coordinates
    /// its window covers (inside the input).
    pub fn input_ranges(&self, axis: &Axis) -> Vec<std::ops::Range<usize>> {
        (0..axis.output)
            .map(|o| {
                let mut taps = (0..self.kernel).filter_map(|k| Window::tap(axis, self.stride, o, k));
                let first = taps.next().unwrap_or(0);
                first..taps.next_back().unwrap_or(first) + 1
            })
            .collect()
    }

    /// ONNX `pads`: [top, left, bottom, right], the end pads being whatever the output size
    /// needs (TF SAME puts the odd one there).
    pub fn onnx_pads(&self) -> Vec<usize> {
        let after = |a: &Axis| ((a.output - 1) * self.stride + self.kernel).saturating_sub(a.input + a.pad_before);
        vec![self.h.pad_before, self.w.pad_before, after(&self.h), after(&self.w)]
    }

    /// `for_each_window`'s windows listed once, for loops that visit them for every sample.
    pub fn table(&self) -> WindowTable {
        let mut table = WindowTable { ends: Vec::with_capacity(self.out_pixels()), taps: Vec::new() };
        self.for_each_window(|_, taps| {
            table.taps.extend_from_slice(taps);
            table.ends.push(table.taps.len());
        });
        table
    }

    /// The windows turned around: for each input pixel, the (tap, output pixel) pairs of the
    /// windows that contain it, in output order. (`WindowTable::for_each` then passes the
    /// input pixel where `table`'s passes the output pixel.)
    pub fn inverse_table(&self) -> WindowTable {
        let mut lists = vec![Vec::new(); self.in_pixels()];
        self.for_each_window(|o, taps| taps.iter().for_each(|&(tap, i)| lists[i].push((tap, o))));
        let mut table = WindowTable { ends: Vec::with_capacity(lists.len()), taps: Vec::new() };
        for list in lists {
            table.taps.extend(list);
            table.ends.push(table.taps.len());
        }
        table
    }
}

/// Every output pixel's (tap, input pixel) pairs (`Window::table`): the padding checks done
/// once per layer instead of once per pixel of every sample.
pub struct WindowTable {
    ends: Vec<usize>,
    taps: Vec<(usize, usize)>,
}

impl WindowTable {
    /// The same windows with each input pixel `i` renamed `f(i)`.
    pub fn map_inputs(&self, f: impl Fn(usize) -> usize) -> WindowTable {
        WindowTable { ends: self.ends.clone(), taps: self.taps.iter().map(|&(t, i)| (t, f(i))).collect() }
    }

    /// `f(output pixel, taps)` for every output pixel, in order.
    #[inline(always)]
    pub fn for_each(&self, mut f: impl FnMut(usize, &[(usize, usize)])) {
        let mut start = 0;
        for (o, &end) in self.ends.iter().enumerate() {
            f(o, &self.taps[start..end]);
            start = end;
        }
    }
}

/// Split `batch` samples into one contiguous range per pool thread: the unit of parallel work
/// for every layer, fixed by the thread count so results are reproducible for a given count.
pub fn sample_ranges(batch: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().min(batch).max(1);
    (0..parts).map(|p| (p * batch / parts)..((p + 1) * batch / parts)).collect()
}

/// Reduce per-thread partials in a fixed order (reproducible for a thread count) into `out`,
/// then recycle them.
pub fn sum_partials(partials: Vec<Vec<f32>>, out: &mut [f32]) {
    use rayon::prelude::*;
    out.par_chunks_mut(1 << 14).enumerate().for_each(|(i, a)| {
        let range = i << 14..(i << 14) + a.len();
        a.copy_from_slice(&partials[0][range.clone()]);
        for p in &partials[1..] {
            a.iter_mut().zip(&p[range.clone()]).for_each(|(a, b)| *a += b);
        }
    });
    partials.into_iter().for_each(scratch::give_back);
}

/// Split a batch buffer into one mutable slice per sample range.
pub fn split_by_ranges<'a>(mut buf: &'a mut [f32], ranges: &[std::ops::Range<usize>], per_sample: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = buf.split_at_mut(r.len() * per_sample);
        out.push(head);
        buf = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_pool_geometry_matches_tensorflow() {
        // k=3, s=2 (the seed model's pools): 28->14 pad (0,1), 14->7 pad (0,1), 7->4 pad (1,1).
        let a = Padding::Same.resolve(28, 3, 2).unwrap();
        assert_eq!((a.output, a.pad_before), (14, 0));
        let b = Padding::Same.resolve(14, 3, 2).unwrap();
        assert_eq!((b.output, b.pad_before), (7, 0));
        let c = Padding::Same.resolve(7, 3, 2).unwrap();
        assert_eq!((c.output, c.pad_before), (4, 1));
        assert_eq!(Padding::Valid.resolve(227, 11, 4).unwrap().output, 55);
        assert_eq!(Padding::Explicit(2).resolve(27, 5, 1).unwrap().output, 27);
        assert!(Padding::Valid.resolve(2, 3, 1).is_none());
    }
}
