//! What every layer kind provides, so that the model, checkpoints, the summary, ONNX export and
//! the roofline handle any layer the same way. A kind is one file: its spec (the serialised
//! form in an architecture), `Spec::resolve` (shapes and parameters for an input shape), and
//! its `Layer`: forward, backward, ONNX node. The list of kinds is `layer_kinds!` in `mod.rs`.

use super::aligned::AlignedBuf;
use super::conv_algo::ConvAlgos;
use crate::onnx_graph::OnnxGraph;
use anyhow::Result;
use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

/// A layer kind's spec: what an architecture writes down for it.
pub trait Spec {
    /// The layer for an input of `input` (height, width, channels), or why it does not fit.
    fn resolve(&self, input: [usize; 3]) -> Result<Arc<dyn Layer>>;
}

/// A resolved layer: fixed geometry, parameters described, passes over caller-owned buffers
/// (NHWC, `n` samples).
pub trait Layer: Debug + Send + Sync + Any {
    /// The layer's own name (named layers carry their parameters' prefix: "conv1", "fc6",
    /// "features.0"); unnamed ones are called `kind` plus a count ("pool1", "lrn2").
    fn name(&self) -> Option<&str> {
        None
    }
    /// What unnamed layers of this kind are called, before their count.
    fn kind(&self) -> &'static str;
    /// Per-sample output height, width, channels.
    fn output_shape(&self) -> [usize; 3];
    /// The parameters, in the order `forward` and `backward` receive them.
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    /// What a workspace at `batch` keeps between forward and backward (`training`), or for a
    /// convolution with algorithms `algos`.
    fn saved(&self, _batch: usize, _training: bool, _algos: Option<ConvAlgos>) -> Saved {
        Saved::None
    }
    /// Whether the layer is the identity in `mode` (dropout at evaluation): the model then
    /// skips it and the next layer reads its input.
    fn is_identity(&self, _mode: Mode) -> bool {
        false
    }
    fn forward(&self, pass: Forward);
    /// Fills the parameters' gradients (trainable ones) and `dx` when given; may overwrite `dy`.
    fn backward(&self, pass: Backward);
    /// Whether a pass runs this layer and `next` (the layer after it) as one, with
    /// these algorithms: `forward_with_next` and `backward_with_next`, which never write this
    /// layer's own output. (A direct convolution and its max-pool, sample by sample in cache.)
    fn fuses_with(&self, _next: &dyn Layer, _algos: Option<ConvAlgos>) -> bool {
        false
    }
    /// This layer and `next` forward: `pass.y` is `next`'s output, `next_saved` what it keeps.
    fn forward_with_next(&self, _next: &dyn Layer, _pass: Forward, _next_saved: &mut Saved) {
        unreachable!("{} fuses with no layer", self.kind())
    }
    /// Backward of `forward_with_next`: `pass.y` and `pass.dy` are `next`'s output and its gradient.
    fn backward_with_next(&self, _next: &dyn Layer, _pass: Backward, _next_saved: &Saved) {
        unreachable!("{} fuses with no layer", self.kind())
    }
    /// Appends the layer's inference nodes reading `input` (NCHW); returns its output's name.
    /// Takes `params`' names (the graph's initialisers).
    fn onnx(&self, graph: &mut OnnxGraph, name: &str, input: String, params: &[&str]) -> String;
    /// The GEMM im2col would run in forward, as (groups, rows, columns, depth): the roofline's
    /// ceiling for the layers that multiply matrices.
    fn gemm(&self, _batch: usize) -> Option<[usize; 4]> {
        None
    }
}

impl dyn Layer {
    /// The concrete layer, for the few places that need one kind's geometry (a convolution's
    /// algorithm choice, the first convolution's filters).
    pub fn downcast<T: Layer>(&self) -> Option<&T> {
        (self as &dyn Any).downcast_ref::<T>()
    }
}

/// A parameter a layer declares.
pub struct ParamSpec {
    pub name: String,
    /// PyTorch's shape for it (what checkpoints hold).
    pub torch_shape: Vec<usize>,
    pub layout: ParamLayout,
    /// Weight decay applies to weights, not biases.
    pub decay: bool,
}

impl ParamSpec {
    /// A layer's `NAME.weight` (decayed, in `layout`) and its `NAME.bias` of `torch_shape[0]` outputs.
    pub fn weight_and_bias(name: &str, torch_shape: Vec<usize>, layout: ParamLayout) -> Vec<ParamSpec> {
        let bias = ParamSpec { name: format!("{name}.bias"), torch_shape: vec![torch_shape[0]], layout: ParamLayout::Same, decay: false };
        vec![ParamSpec { name: format!("{name}.weight"), torch_shape, layout, decay: true }, bias]
    }
}

/// How one parameter maps between our layout and PyTorch's (see `checkpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamLayout {
    Same,
    /// Conv weight: ours [k][k][cin_g][out], PyTorch [out][cin_g][k][k].
    Hwio {
        k: usize,
        cin_g: usize,
        out: usize,
    },
    /// FC weight after a spatial layer: column (y*w + x)*c + ch, PyTorch ch*h*w + y*w + x.
    FlattenHwc {
        out: usize,
        h: usize,
        w: usize,
        c: usize,
    },
}

/// A trainable tensor. `value` is in the engine's layout; `torch_shape` is the PyTorch shape
/// it is saved under (`layout` says how they differ).
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub torch_shape: Vec<usize>,
    pub layout: ParamLayout,
    pub value: Vec<f32>,
    pub grad: Vec<f32>,
    /// Weight decay applies to weights, not biases.
    pub decay: bool,
    /// This parameter's learning rate over the run's (`--lr-mult`); 0: frozen (`--freeze-through`):
    /// no gradient, no optimiser state, never updated.
    pub lr_mult: f32,
}

impl Param {
    pub fn trainable(&self) -> bool {
        self.lr_mult > 0.0
    }
}

/// How a forward pass treats dropout.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Eval,
    /// Training, with the dropout masks drawn from this stream (see `rng::stream_id`), one
    /// generator per sample keyed by `first_sample` + its index in the batch: a batch split
    /// over data-parallel ranks draws the masks one whole batch would.
    Train {
        stream: u64,
        first_sample: usize,
        /// Dropout's keep probability (1: no dropout).
        keep: f32,
    },
}

/// What a layer keeps from forward for backward, beyond its input and output.
#[derive(Debug)]
pub enum Saved {
    None,
    /// A max-pool's argmax, on cache lines like the activations (a fused convolution streams it).
    Argmax(AlignedBuf<u8>),
    /// A convolution fused with the max-pool after it (`ConvPool`): each sample's active pooled
    /// outputs (`conv_pool::Kept::active`), sized by the first fused forward.
    ActiveWindows(Vec<u64>),
    Values(Vec<f32>),
    /// Dropout's mask, a byte an element (1: kept, 0: dropped; a quarter of the bytes of the
    /// mask's values), and the kept elements' scale, 1 / keep, set by the forward.
    Mask {
        kept: Vec<u8>,
        scale: f32,
    },
    /// An evaluation workspace's parameters transformed for the layer's algorithm (a Winograd
    /// convolution's U), kept across passes with a copy of the weights they were made from.
    Transformed {
        of: Vec<f32>,
        values: Vec<f32>,
    },
}

impl Saved {
    pub fn values(&mut self) -> Option<&mut Vec<f32>> {
        match self {
            Saved::Values(v) => Some(v),
            _ => None,
        }
    }
}

/// One layer's forward pass.
pub struct Forward<'a> {
    /// Samples in the batch.
    pub n: usize,
    pub x: &'a [f32],
    pub y: &'a mut [f32],
    pub params: &'a [Param],
    pub saved: &'a mut Saved,
    /// A convolution's algorithms (see `autotune`).
    pub algos: Option<ConvAlgos>,
    pub mode: Mode,
    /// The layer's index in the model (keys its dropout stream).
    pub index: usize,
}

/// One layer's backward pass: `dy` is the gradient of its output.
pub struct Backward<'a> {
    pub n: usize,
    pub x: &'a [f32],
    pub y: &'a [f32],
    pub dy: &'a mut [f32],
    /// The input's gradient, when a layer below needs it.
    pub dx: Option<&'a mut [f32]>,
    pub params: &'a mut [Param],
    pub saved: &'a mut Saved,
    pub algos: Option<ConvAlgos>,
}

/// The elements of a per-sample shape, or `None` if empty or over `max` (bounds what a
/// hostile model file can ask for).
pub fn shape_len(shape: &[usize], max: usize) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n > 0 && n <= max)
}
