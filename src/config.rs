//! Every hyperparameter of a training run in one struct, saved as `config.json` in the run
//! directory.

use crate::autotune::ConvAlgoPolicy;
use crate::optim::{OptimizerConfig, OptimizerKind};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: String,
    pub batch_size: usize,
    /// Training samples to process (the notebook's `training_iters`), unless `epochs` is set.
    pub samples: usize,
    pub epochs: Option<usize>,
    pub optimizer: OptimizerKind,
    pub lr: f32,
    /// Step schedule: multiply the learning rate by `lr_gamma` every `lr_step_epochs` epochs.
    pub lr_step_epochs: Option<usize>,
    pub lr_gamma: f32,
    /// Plateau schedule: multiply the learning rate by `lr_gamma` when the validation error
    /// has not improved for this many epochs (the paper's schedule).
    #[serde(default)]
    pub lr_plateau_patience: Option<usize>,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// Dropout keep probability (the notebook's `keep_prob`).
    pub keep_prob: f32,
    pub init_bias: f32,
    pub seed: u64,
    /// Worker threads per process.
    pub threads: usize,
    /// Data-parallel processes (MPI ranks), each taking `batch_size / ranks` of every batch.
    #[serde(default = "one")]
    pub ranks: usize,
    /// Random translation of up to this many pixels per image per epoch (0 = off).
    pub augment_shift: usize,
    pub display_step: usize,
    /// Write a training checkpoint every this many steps (0: only at epoch ends and on exit).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    pub eval_batch: usize,
    /// Evaluate ImageFolder data on ten crops (corners, centre, reflections) instead of one.
    #[serde(default)]
    pub ten_crop: bool,
    /// Fail on unreadable images instead of skipping them with a warning.
    #[serde(default)]
    pub strict_images: bool,
    /// Random images instead of `data`, for throughput runs.
    #[serde(default)]
    pub dummy: bool,
    pub data: Option<PathBuf>,
    pub out: PathBuf,
    /// How each convolution's algorithms are chosen (`auto`: measured, see `autotune`).
    #[serde(default)]
    pub conv_algo: ConvAlgoPolicy,
    /// Where measured algorithm choices and dataset statistics are cached (default:
    /// `cache_dir::default_cache_dir`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

fn one() -> usize {
    1
}

pub fn default_checkpoint_every() -> usize {
    500
}

impl TrainConfig {
    /// Where this run caches what it measures or computes: `cache_dir`, else the user's.
    pub fn resolved_cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir.clone().or_else(crate::cache_dir::default_cache_dir)
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
