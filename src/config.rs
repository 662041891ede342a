//! Every hyperparameter of a training run in one struct, saved as `config.json` in the run
//! directory.

use crate::architectures::{Recipe, recipe};
use crate::autotune::ConvAlgoPolicy;
use crate::model::LrMult;
use crate::optim::{OptimizerConfig, OptimizerKind};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Every hyperparameter of a run: `alexnet train`'s flags are this struct's fields (each flag,
/// its help and its default written here once), less the few that depend on the model, which
/// `ModelDefaults` takes and fills in from the model's recipe. Saved as the run's config.json.
#[derive(Clone, Debug, Serialize, Deserialize, clap::Args)]
pub struct TrainConfig {
    /// The network: alexnet-mnist (the notebook's), alexnet and alexnet-2gpu (the paper's one-
    /// and two-tower nets), alexnet-owt (torchvision's).
    #[arg(long, default_value = "alexnet-mnist")]
    pub model: String,
    /// Train at this input size (square; default: the model's own, 28, 227 or 224):
    /// alexnet-owt takes any size from 63 as torchvision's does.
    #[serde(default)]
    #[arg(long, value_name = "PIXELS")]
    pub input_size: Option<usize>,
    #[arg(skip)]
    pub batch_size: usize,
    /// Training samples to process (the notebook's training_iters), unless --epochs is set.
    #[arg(long, default_value_t = 300_000)]
    pub samples: usize,
    /// Train for whole epochs instead of --samples.
    #[arg(long, conflicts_with = "samples")]
    pub epochs: Option<usize>,
    #[arg(skip = OptimizerKind::Adam)]
    pub optimizer: OptimizerKind,
    #[arg(skip)]
    pub lr: f32,
    /// Multiply the learning rate by --lr-gamma every this many epochs (default: constant).
    #[arg(long)]
    pub lr_step_epochs: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub lr_gamma: f32,
    #[serde(default)]
    #[arg(skip)]
    pub lr_plateau_patience: Option<usize>,
    /// Adam's beta1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    /// Adam's beta2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f32,
    /// Adam's epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub epsilon: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// SGD weight decay (on weights, not biases).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,
    #[arg(skip)]
    pub keep_prob: f32,
    /// Initial value of every bias (weights per the model's init).
    #[arg(long, default_value_t = 0.0)]
    pub init_bias: f32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker threads per process (the global --threads).
    #[arg(skip)]
    pub threads: usize,
    /// Data-parallel processes (MPI ranks), each taking `batch_size / ranks` of every batch.
    #[serde(default = "one")]
    #[arg(skip = 1usize)]
    pub ranks: usize,
    /// Random translation of up to this many pixels per image per epoch (0 = off).
    #[arg(skip)]
    pub augment_shift: usize,
    /// Print the minibatch loss and accuracy every this many steps.
    #[arg(long, default_value_t = 100)]
    pub display_step: usize,
    /// Write a training checkpoint every this many steps (0: only at epoch ends and on exit).
    #[serde(default = "default_checkpoint_every")]
    #[arg(long, default_value_t = default_checkpoint_every())]
    pub checkpoint_every: usize,
    #[arg(skip)]
    pub eval_batch: usize,
    /// Write no TensorBoard event files (they are written by default: `tensorboard --logdir runs/`).
    #[serde(default)]
    #[arg(long)]
    pub no_tensorboard: bool,
    /// TensorBoard histograms of every weight and gradient every this many display steps (0: none).
    #[serde(default = "default_histogram_every")]
    #[arg(long, default_value_t = default_histogram_every())]
    pub histogram_every: usize,
    /// Evaluate ImageFolder data on ten crops (four corners, centre, and their reflections).
    #[serde(default)]
    #[arg(long)]
    pub ten_crop: bool,
    /// Fail on unreadable images instead of skipping them with a warning.
    #[serde(default)]
    #[arg(long)]
    pub strict_images: bool,
    /// Random images with fixed labels instead of data (throughput runs).
    #[serde(default)]
    #[arg(long, conflicts_with = "data")]
    pub dummy: bool,
    /// MNIST IDX files (default: $ALEXNET_DATA or the vendored copy), or an ImageFolder
    /// dataset (DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(skip)]
    pub out: PathBuf,
    /// Start from this model file's weights (ours, or a PyTorch state dict saved as
    /// safetensors: torchvision's alexnet maps onto alexnet-owt): every tensor whose name and
    /// shape match is loaded; the rest (the classifier, when the class count differs) starts fresh.
    #[serde(default)]
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    /// Freeze every layer up to and including this one (e.g. fc7: train only the classifier;
    /// conv5: train the fully connected layers): no gradients, no optimiser state.
    #[serde(default)]
    #[arg(long, value_name = "LAYER")]
    pub freeze_through: Option<String>,
    /// This layer's learning rate is X times --lr (repeatable), e.g. --lr-mult fc8=10.
    #[serde(default)]
    #[arg(long, value_name = "LAYER=X")]
    pub lr_mult: Vec<LrMult>,
    #[serde(flatten)]
    #[command(flatten)]
    pub conv: ConvFlags,
}

/// How the convolutions' algorithms are chosen (`train` and `bench`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, clap::Args)]
pub struct ConvFlags {
    /// Each convolution's algorithm per pass: measured on this machine at the start (auto,
    /// cached), or one forced wherever it applies.
    #[serde(default)]
    #[arg(long, value_enum, default_value_t = ConvAlgoPolicy::Auto)]
    pub conv_algo: ConvAlgoPolicy,
    /// Where measured choices and dataset statistics are cached (default: $ALEXNET_CACHE_DIR,
    /// else $XDG_CACHE_HOME/alexnet, else ~/.cache/alexnet).
    #[serde(default)]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// The flags whose defaults depend on the model (its `Recipe`) or are derived: absent ones
/// are filled in by `into_config`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ModelDefaults {
    /// Default: the model's recipe (the notebook's 64 for alexnet-mnist, the paper's 128 for the others).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Default: the model's recipe (Adam for alexnet-mnist, the paper's SGD for the others).
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Default: 0.001 with Adam, the paper's 0.01 with SGD.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Multiply the learning rate by --lr-gamma when the validation error has not improved for
    /// this many epochs (the paper's schedule; default for the ImageNet models: 2).
    #[arg(long)]
    pub lr_plateau_patience: Option<usize>,
    /// Dropout keep probability (default: the notebook's 0.8 for alexnet-mnist, the paper's 0.5 otherwise).
    #[arg(long)]
    pub keep_prob: Option<f32>,
    /// Evaluation batch (default: 1000 for alexnet-mnist, the training batch otherwise).
    #[arg(long)]
    pub eval_batch: Option<usize>,
    /// Random translations of the training digits (the paper's crop augmentation for MNIST).
    #[arg(long)]
    pub augment: bool,
    /// Largest shift in pixels with --augment.
    #[arg(long, default_value_t = 2)]
    pub shift: usize,
    /// Run directory (default: runs/MODEL-UNIXTIME).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl ModelDefaults {
    /// `config` with these flags, or the model's recipe where they are absent; `out` is the run
    /// directory to use when --out is absent.
    pub fn into_config(self, mut config: TrainConfig, out: impl FnOnce() -> PathBuf) -> TrainConfig {
        let recipe = recipe(&config.model);
        config.batch_size = self.batch_size.unwrap_or(recipe.batch_size);
        config.optimizer = self.optimizer.unwrap_or(recipe.optimizer);
        config.lr = self.lr.unwrap_or(Recipe::lr(config.optimizer));
        config.lr_plateau_patience = self.lr_plateau_patience.or(recipe.lr_plateau_patience.filter(|_| config.lr_step_epochs.is_none()));
        config.keep_prob = self.keep_prob.unwrap_or(recipe.keep_prob);
        config.eval_batch = self.eval_batch.or(recipe.eval_batch).unwrap_or(config.batch_size);
        config.augment_shift = if self.augment { self.shift } else { 0 };
        config.out = self.out.unwrap_or_else(out);
        config
    }
}

impl TrainConfig {
    /// What `alexnet train --model MODEL` runs with: every flag at its default.
    pub fn defaults(model: &str) -> TrainConfig {
        use clap::{Args, FromArgMatches};
        let command = ModelDefaults::augment_args(TrainConfig::augment_args(clap::Command::new("train")));
        let matches = command.get_matches_from(["train", "--model", model]);
        let config = TrainConfig::from_arg_matches(&matches).expect("the defaults parse");
        ModelDefaults::from_arg_matches(&matches).expect("the defaults parse").into_config(config, PathBuf::new)
    }
}

fn one() -> usize {
    1
}

fn default_checkpoint_every() -> usize {
    500
}

fn default_histogram_every() -> usize {
    10
}

impl TrainConfig {
    /// The run's network: its model at its input size, with `classes` outputs (default: the model's own).
    pub fn architecture(&self, classes: Option<usize>) -> Result<crate::model::Architecture> {
        crate::architectures::with_input_size(crate::architectures::architecture(&self.model, classes)?, self.input_size)
    }

    /// Where this run caches what it measures or computes: `cache_dir`, else the user's.
    pub fn resolved_cache_dir(&self) -> Option<PathBuf> {
        self.conv.cache_dir.clone().or_else(crate::cache_dir::default_cache_dir)
    }

    /// Reject values that would crash or silently misbehave, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(self.keep_prob > 0.0 && self.keep_prob <= 1.0) {
            bail!("--keep-prob must be in (0, 1], got {}", self.keep_prob);
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.ranks == 0 || !self.batch_size.is_multiple_of(self.ranks) {
            bail!("--batch-size {} does not split evenly over {} ranks: pick a multiple of {}", self.batch_size, self.ranks, self.ranks);
        }
        if self.display_step == 0 || self.eval_batch == 0 {
            bail!("--display-step and --eval-batch must be at least 1");
        }
        if self.epochs == Some(0) {
            bail!("--epochs must be at least 1");
        }
        if self.epochs.is_none() && self.samples < self.batch_size {
            bail!("nothing to train: --samples {} is less than one batch of {}", self.samples, self.batch_size);
        }
        if self.lr_step_epochs == Some(0) || self.lr_plateau_patience == Some(0) || !(self.lr_gamma > 0.0 && self.lr_gamma <= 1.0) {
            bail!("--lr-step-epochs and --lr-plateau-patience must be at least 1 and --lr-gamma in (0, 1]");
        }
        if self.lr_step_epochs.is_some() && self.lr_plateau_patience.is_some() {
            bail!("choose one learning-rate schedule: --lr-step-epochs or --lr-plateau-patience");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) || !(0.0..1.0).contains(&self.momentum) {
            bail!("--beta1, --beta2 and --momentum must be in [0, 1)");
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 || self.epsilon.is_nan() || self.epsilon <= 0.0 {
            bail!("--weight-decay must be >= 0 and --epsilon > 0");
        }
        if self.augment_shift > 8 {
            bail!("--shift {} is too large for 28x28 digits (at most 8)", self.augment_shift);
        }
        Ok(())
    }

    pub fn optimizer_config(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            epsilon: self.epsilon,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
        }
    }

    /// The learning rate during `epoch` (0-based) under the step schedule.
    pub fn lr_at(&self, epoch: usize) -> f32 {
        match self.lr_step_epochs {
            Some(every) => self.lr * self.lr_gamma.powi((epoch / every) as i32),
            None => self.lr,
        }
    }

    /// Total optimiser steps, dropping each epoch's last partial batch.
    pub fn total_steps(&self, train_len: usize) -> usize {
        match self.epochs {
            Some(e) => e * (train_len / self.batch_size),
            None => self.samples / self.batch_size,
        }
    }
}
