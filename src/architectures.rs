//! The model zoo: each network as a stack of layer specs. `Model::new` resolves the shapes.

use crate::layers::Padding;
use crate::layers::adaptive_avg_pool::AdaptiveAvgPoolSpec;
use crate::layers::convolution::ConvSpec;
use crate::layers::dropout::DropoutSpec;
use crate::layers::linear::LinearSpec;
use crate::layers::lrn::LrnParams;
use crate::layers::pool::MaxPoolSpec;
use crate::model::{Architecture, Init, LayerSpec};
use crate::optim::OptimizerKind;
use anyhow::{Result, bail};

pub const MODEL_NAMES: &[&str] = &["alexnet-mnist", "alexnet", "alexnet-2gpu", "alexnet-owt"];

/// How a model trains unless told otherwise: the notebook's recipe for the seed model, the
/// paper's for the ImageNet models. `train`, `bench` and `eval` all take their defaults here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recipe {
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    /// The paper's plateau schedule (divide by 10 when the validation error stalls) for the
    /// ImageNet models; the notebook keeps its rate constant.
    pub lr_plateau_patience: Option<usize>,
    /// Dropout keep probability: the notebook's 0.8, the paper's 0.5.
    pub keep_prob: f32,
    /// Evaluation batch; `None`: the training batch.
    pub eval_batch: Option<usize>,
}

impl Recipe {
    /// The learning rate each optimiser starts at: Adam's 1e-3 (the notebook's), SGD's 0.01
    /// (the paper's).
    pub fn lr(optimizer: OptimizerKind) -> f32 {
        match optimizer {
            OptimizerKind::Adam => 1e-3,
            OptimizerKind::Sgd => 0.01,
        }
    }
}

/// The recipe of model `name` (the seed model's, or the paper's for any other).
pub fn recipe(name: &str) -> Recipe {
    if name == "alexnet-mnist" {
        Recipe { batch_size: 64, optimizer: OptimizerKind::Adam, lr_plateau_patience: None, keep_prob: 0.8, eval_batch: Some(1000) }
    } else {
        Recipe { batch_size: 128, optimizer: OptimizerKind::Sgd, lr_plateau_patience: Some(2), keep_prob: 0.5, eval_batch: None }
    }
}

fn conv(name: &str, out_c: usize, kernel: usize, stride: usize, padding: Padding, groups: usize) -> LayerSpec {
    LayerSpec::Conv(ConvSpec { name: name.into(), out_c, kernel, stride, padding, groups, relu: true })
}

fn linear(name: &str, out: usize, relu: bool) -> LayerSpec {
    LayerSpec::Linear(LinearSpec { name: name.into(), out, relu })
}

/// Every model's pooling: overlapping 3x3 windows at stride 2 (the paper's section 3.4).
fn max_pool(padding: Padding) -> LayerSpec {
    LayerSpec::MaxPool(MaxPoolSpec { kernel: 3, stride: 2, padding })
}

fn dropout() -> LayerSpec {
    LayerSpec::Dropout(DropoutSpec {})
}

/// The notebook's AlexNet for 28x28 MNIST: 3 x [conv 3x3 SAME + ReLU -> max-pool 3x3/2 SAME ->
/// LRN -> dropout] with 64/128/256 channels, then FC 1024, FC 1024, FC 10.
pub fn alexnet_mnist() -> Architecture {
    let lrn = LrnParams { depth_radius: 4, bias: 1.0, alpha: 0.001 / 9.0, beta: 0.75 };
    let mut layers = Vec::new();
    for (i, out_c) in [64, 128, 256].into_iter().enumerate() {
        layers.push(conv(&format!("conv{}", i + 1), out_c, 3, 1, Padding::Same, 1));
        layers.push(max_pool(Padding::Same));
        layers.push(LayerSpec::Lrn(lrn));
        layers.push(dropout());
    }
    layers.extend([linear("fc1", 1024, true), linear("fc2", 1024, true), linear("fc3", 10, false)]);
    Architecture { name: "alexnet-mnist".into(), input: [28, 28, 1], layers, init: Init::He, input_scale: 1.0 }
}

/// The paper's network (Krizhevsky et al. 2012, figure 2). Input 227x227x3: the paper says 224,
/// but an 11x11 stride-4 kernel without padding then covers (224 - 11) / 4 + 1 = 54.25
/// positions; 227 gives the 55x55 of the paper's own layer sizes. Initialised as the paper's
/// section 5 says. LRN (k=2, n=5, alpha=1e-4,
/// beta=0.75: TF's depth_radius 2, bias 2) follows the ReLU of conv1 and conv2; overlapping
/// 3x3/2 pooling follows both LRNs and conv5 (-> 6x6x256); dropout 0.5 precedes FC 4096 twice.
///
/// `towers = 2` is the paper's two-GPU model: conv2, conv4 and conv5 see only their own tower's
/// half of the previous layer's kernels (groups of 2), while conv3 and the FC layers connect
/// across towers (60,965,224 parameters with 1000 classes, as Caffe's bvlc_alexnet).
pub fn alexnet(towers: usize, classes: usize) -> Architecture {
    let lrn = LrnParams { depth_radius: 2, bias: 2.0, alpha: 1e-4, beta: 0.75 };
    let pool = max_pool(Padding::Valid);
    let layers = vec![
        conv("conv1", 96, 11, 4, Padding::Valid, 1),
        LayerSpec::Lrn(lrn),
        pool.clone(),
        conv("conv2", 256, 5, 1, Padding::Explicit(2), towers),
        LayerSpec::Lrn(lrn),
        pool.clone(),
        conv("conv3", 384, 3, 1, Padding::Explicit(1), 1),
        conv("conv4", 384, 3, 1, Padding::Explicit(1), towers),
        conv("conv5", 256, 3, 1, Padding::Explicit(1), towers),
        pool,
        dropout(),
        linear("fc6", 4096, true),
        dropout(),
        linear("fc7", 4096, true),
        linear("fc8", classes, false),
    ];
    let name = if towers == 1 { "alexnet".to_string() } else { format!("alexnet-{towers}gpu") };
    // The paper's section 5: N(0, 0.01) weights; biases 1 in conv2, conv4, conv5 and the
    // hidden FC layers, 0 elsewhere.
    let unit_bias = ["conv2", "conv4", "conv5", "fc6", "fc7"].map(String::from).to_vec();
    Architecture { name, input: [227, 227, 3], layers, init: Init::Gaussian { std: 0.01, unit_bias }, input_scale: 1.0 }
}

/// torchvision's `alexnet` ("one weird trick" single-tower variant): 64/192/384/256/256
/// channels, padding 2 on conv1, no LRN, 224x224 input, 61,100,840 parameters. Layers carry
/// torchvision's module names, so its state dict loads unchanged. Its adaptive average pooling
/// to 6x6 lets it take any input from 63x63 up (`with_input_size`); at 224 it is the identity.
pub fn alexnet_owt(classes: usize) -> Architecture {
    let pool = max_pool(Padding::Valid);
    let layers = vec![
        conv("features.0", 64, 11, 4, Padding::Explicit(2), 1),
        pool.clone(),
        conv("features.3", 192, 5, 1, Padding::Explicit(2), 1),
        pool.clone(),
        conv("features.6", 384, 3, 1, Padding::Explicit(1), 1),
        conv("features.8", 256, 3, 1, Padding::Explicit(1), 1),
        conv("features.10", 256, 3, 1, Padding::Explicit(1), 1),
        pool,
        LayerSpec::AdaptiveAvgPool(AdaptiveAvgPoolSpec { output: [6, 6] }),
        dropout(),
        linear("classifier.1", 4096, true),
        dropout(),
        linear("classifier.4", 4096, true),
        linear("classifier.6", classes, false),
    ];
    Architecture { name: "alexnet-owt".into(), input: [224, 224, 3], layers, init: Init::He, input_scale: 1.0 / 58.4 }
}

/// `arch` at a square input of `side` pixels (`--input-size`; `None` keeps its own): any size
/// from 63 for alexnet-owt, whose adaptive pooling keeps the classifier's shape; the other
/// models' first FC layer changes width with the input.
pub fn with_input_size(mut arch: Architecture, side: Option<usize>) -> Result<Architecture> {
    let Some(side) = side else { return Ok(arch) };
    arch.input = [side, side, arch.input[2]];
    if let Err(e) = crate::model::Model::parameter_count(&arch) {
        bail!("--input-size {side}: {} does not take {side}x{side} inputs ({e:#})", arch.name);
    }
    Ok(arch)
}

/// Look up an architecture by its command-line name; `classes` overrides the model's own
/// (10 for MNIST, 1000 for ImageNet).
pub fn architecture(name: &str, classes: Option<usize>) -> Result<Architecture> {
    if classes == Some(0) {
        bail!("--classes must be at least 1");
    }
    let mut arch = match name {
        "alexnet-mnist" => alexnet_mnist(),
        "alexnet" => alexnet(1, 1000),
        "alexnet-2gpu" => alexnet(2, 1000),
        "alexnet-owt" => alexnet_owt(1000),
        other => bail!("unknown model '{other}' (known: {})", MODEL_NAMES.join(", ")),
    };
    if let (Some(n), Some(LayerSpec::Linear(fc))) = (classes, arch.layers.last_mut()) {
        fc.out = n;
    }
    Ok(arch)
}
