//! The convolution layer kind: `relu?(conv(x, W) + b)` with any kernel, stride, padding and
//! groups (the paper's two towers). The arithmetic is in `conv` (direct, im2col), `winograd`
//! and `conv_pool` (a direct convolution and the max-pool after it as one pass); `conv_algo`
//! runs whichever `autotune` chose for each pass.

use super::conv::Conv;
use super::conv_pool::{ConvPool, Kept};
use super::conv_algo::{self, ConvAlgo, ConvAlgos};
use super::pool::MaxPool;
use super::simd::L;
use super::layer::{Backward, Forward, Layer, ParamLayout, ParamSpec, Saved, Spec};
use super::winograd::{self, Transforms};
use super::{Padding, Window};
use crate::onnx_graph::{OnnxGraph, int, ints};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvSpec {
    /// Prefix of its parameters' names ("conv1" -> "conv1.weight", "conv1.bias").
    pub name: String,
    pub out_c: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
    pub groups: usize,
    pub relu: bool,
}

pub struct Convolution {
    pub name: String,
    pub conv: Conv,
    /// This convolution and the max-pool after it, where they fuse: built at the first pass
    /// that runs them as one.
    pooled: OnceLock<ConvPool<L>>,
}

impl std::fmt::Debug for Convolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Convolution").field("name", &self.name).field("conv", &self.conv).finish_non_exhaustive()
    }
}

impl Convolution {
    /// `f` of this convolution fused with `pool`: the pair built at the first call, and kept
    /// (a layer's next layer does not change; a different pool gets a pair of its own).
    fn with_pool<R>(&self, pool: &MaxPool, f: impl FnOnce(&ConvPool<L>) -> R) -> R {
        match self.pooled.get_or_init(|| ConvPool::new(&self.conv, pool)) {
            pair if pair.pools_with(pool) => f(pair),
            _ => f(&ConvPool::new(&self.conv, pool)),
        }
    }
}

impl Spec for ConvSpec {
    fn resolve(&self, [h, w, c]: [usize; 3]) -> Result<Arc<dyn Layer>> {
        let Some(win) = Window::new(h, w, self.kernel, self.stride, self.padding) else {
            bail!("{}: a {k}x{k} window does not fit input {h}x{w}x{c}", self.name, k = self.kernel);
        };
        let groups = self.groups;
        if groups == 0 || !c.is_multiple_of(groups) || !self.out_c.is_multiple_of(groups) {
            bail!("{}: channels {c} -> {} not divisible by groups {groups}", self.name, self.out_c);
        }
        let conv = Conv { win, in_c: c, out_c: self.out_c, groups, relu: self.relu };
        Ok(Arc::new(Convolution { name: self.name.clone(), conv, pooled: OnceLock::new() }))
    }
}

impl Layer for Convolution {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn kind(&self) -> &'static str {
        "conv"
    }

    fn output_shape(&self) -> [usize; 3] {
        [self.conv.win.h.output, self.conv.win.w.output, self.conv.out_c]
    }

    fn params(&self) -> Vec<ParamSpec> {
        let c = &self.conv;
        let (k, cin_g, out) = (c.win.kernel, c.in_c / c.groups, c.out_c);
        ParamSpec::weight_and_bias(&self.name, vec![out, cin_g, k, k], ParamLayout::Hwio { k, cin_g, out })
    }

    fn saved(&self, batch: usize, training: bool, algos: Option<ConvAlgos>) -> Saved {
        match algos {
            Some(a) if training && a.keeps_winograd_transforms() => Saved::Values(vec![0.0; winograd::saved_len(&self.conv, batch)]),
            // No weights yet: the first pass makes U.
            Some(a) if !training && a.forward == ConvAlgo::Winograd => {
                Saved::Transformed { of: Vec::new(), values: vec![0.0; winograd::u_len(&self.conv)] }
            }
            // Used where a max-pool follows (`fuses_with`).
            Some(a) if training && a.forward == ConvAlgo::Direct => Saved::ActiveWindows(Vec::new()),
            _ => Saved::None,
        }
    }

    fn forward(&self, f: Forward) {
        let [w, b] = f.params else { unreachable!("weight and bias") };
        let algo = f.algos.expect("a plan for every convolution").forward;
        let transforms = match f.saved {
            Saved::Values(saved) => Transforms::Keep(saved),
            Saved::Transformed { of, values } => Transforms::Cache { of, u: values },
            _ => Transforms::Discard,
        };
        conv_algo::forward(&self.conv, algo, f.n, f.x, &w.value, &b.value, f.y, transforms);
    }

    fn backward(&self, b: Backward) {
        let [w, bias] = b.params else { unreachable!("weight and bias") };
        let algos = b.algos.expect("a plan for every convolution");
        let saved = b.saved.values().map(|v| &mut v[..]);
        let dw = if w.trainable() { Some(&mut w.grad[..]) } else { None };
        conv_algo::backward(&self.conv, algos, b.n, b.x, &w.value, b.y, b.dy, b.dx, dw, &mut bias.grad, saved);
    }

    /// A max-pool after a convolution whose forward runs direct loops: both sample by sample,
    /// the convolution's output never leaving the cache (the seed model's conv1 and pool1).
    fn fuses_with(&self, next: &dyn Layer, algos: Option<ConvAlgos>) -> bool {
        next.downcast::<MaxPool>().is_some() && algos.is_some_and(|a| a.forward == ConvAlgo::Direct)
    }

    fn forward_with_next(&self, next: &dyn Layer, f: Forward, next_saved: &mut Saved) {
        let Some(pool) = next.downcast::<MaxPool>() else { unreachable!("fused with a max-pool") };
        let [w, b] = f.params else { unreachable!("weight and bias") };
        self.with_pool(pool, |pair| {
            // An evaluation workspace keeps nothing for the backward.
            let kept = match (next_saved, f.saved) {
                (Saved::Argmax(argmax), Saved::ActiveWindows(active)) => {
                    active.resize(f.n * pair.active_words(), 0);
                    Some(Kept { argmax: &mut argmax[..], active: &mut active[..] })
                }
                _ => None,
            };
            pair.forward(f.n, f.x, &w.value, &b.value, f.y, kept)
        });
    }

    fn backward_with_next(&self, next: &dyn Layer, b: Backward, next_saved: &Saved) {
        let (Some(pool), Saved::Argmax(argmax), Saved::ActiveWindows(active)) = (next.downcast::<MaxPool>(), next_saved, &*b.saved) else {
            unreachable!("fused with a max-pool, both keeping what the backward needs")
        };
        let [w, bias] = b.params else { unreachable!("weight and bias") };
        let dw = if w.trainable() { Some(&mut w.grad[..]) } else { None };
        self.with_pool(pool, |pair| pair.backward(b.n, b.x, &w.value, &bias.value, b.dy, argmax, active, b.dx, dw, &mut bias.grad));
    }

    fn onnx(&self, graph: &mut OnnxGraph, name: &str, input: String, params: &[&str]) -> String {
        let win = &self.conv.win;
        let attrs = vec![
            ints("kernel_shape", &[win.kernel, win.kernel]),
            ints("strides", &[win.stride, win.stride]),
            ints("pads", &win.onnx_pads()),
            int("group", self.conv.groups as i64),
        ];
        let inputs = vec![input, params[0].to_string(), params[1].to_string()];
        let out = graph.node("Conv", name, inputs, attrs);
        if self.conv.relu { graph.node("Relu", &format!("{name}.relu"), vec![out], vec![]) } else { out }
    }

    fn gemm(&self, batch: usize) -> Option<[usize; 4]> {
        let c = &self.conv;
        Some([c.groups, batch * c.win.out_pixels(), c.out_c / c.groups, c.patch_len()])
    }
}
