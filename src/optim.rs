//! Optimisers over the model's parameters, updated in place, in parallel chunks.

use crate::model::Param;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with TensorFlow 1's update (the notebook's `tf.train.AdamOptimizer`).
    Adam,
    /// SGD with momentum and weight decay, the paper's update rule.
    Sgd,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

/// The optimiser's state: step count and one or two slots per parameter.
pub struct Optimizer {
    pub config: OptimizerConfig,
    pub step: u64,
    /// Adam's first moment, or SGD's velocity.
    pub slot1: Vec<Vec<f32>>,
    /// Adam's second moment (empty for SGD).
    pub slot2: Vec<Vec<f32>>,
}

const CHUNK: usize = 1 << 15;

impl Optimizer {
    pub fn new(config: OptimizerConfig, params: &[Param]) -> Optimizer {
        // Frozen parameters get no state (an empty slot) and are never updated.
        let zeros = || params.iter().map(|p| if p.trainable() { vec![0.0; p.value.len()] } else { Vec::new() }).collect();
        let slot2 = if config.kind == OptimizerKind::Adam { zeros() } else { Vec::new() };
        Optimizer { config, step: 0, slot1: zeros(), slot2 }
    }

    /// Apply one update from the gradients in `params`, with learning rate `lr` (the schedule's
    /// current value).
    pub fn update(&mut self, params: &mut [Param], lr: f32) {
        self.step += 1;
        let c = self.config;
        match c.kind {
            OptimizerKind::Adam => {
                // TF1: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); w -= lr_t * m / (sqrt(v) + eps).
                let t = self.step as i32;
                let lr_t = lr * (1.0 - c.beta2.powi(t)).sqrt() / (1.0 - c.beta1.powi(t));
                for ((p, m), v) in params.iter_mut().zip(&mut self.slot1).zip(&mut self.slot2).filter(|((p, _), _)| p.trainable()) {
                    let lr_t = lr_t * p.lr_mult;
                    p.value
                        .par_chunks_mut(CHUNK)
                        .zip(p.grad.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .for_each(|(((w, g), m), v)| {
                            for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                                *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                                *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                                *w -= lr_t * *m / (v.sqrt() + c.epsilon);
                            }
                        });
                }
            }
            OptimizerKind::Sgd => {
                // The paper: v = momentum * v - decay * lr * w - lr * g; w += v.
                for (p, vel) in params.iter_mut().zip(&mut self.slot1).filter(|(p, _)| p.trainable()) {
                    let (decay, lr) = (if p.decay { c.weight_decay } else { 0.0 }, lr * p.lr_mult);
                    p.value.par_chunks_mut(CHUNK).zip(p.grad.par_chunks(CHUNK)).zip(vel.par_chunks_mut(CHUNK)).for_each(|((w, g), vel)| {
                        for ((w, g), vel) in w.iter_mut().zip(g).zip(vel.iter_mut()) {
                            *vel = c.momentum * *vel - decay * lr * *w - lr * g;
                            *w += *vel;
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::layer::ParamLayout;

    fn param(w: f32, g: f32) -> Vec<Param> {
        vec![Param {
            name: "w".into(),
            torch_shape: vec![1],
            layout: ParamLayout::Same,
            value: vec![w],
            grad: vec![g],
            decay: true,
            lr_mult: 1.0,
        }]
    }

    fn config(kind: OptimizerKind) -> OptimizerConfig {
        OptimizerConfig { kind, lr: 0.1, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, momentum: 0.9, weight_decay: 5e-4 }
    }

    #[test]
    fn adam_matches_tf1_by_hand() {
        // Step 1, g = 0.5: m = 0.05, v = 0.00025, lr_t = 0.1 * sqrt(0.001) / 0.1 = 0.0316228,
        // w -= lr_t * 0.05 / (0.0158114 + 1e-8) -> w = 1 - 0.1 = 0.9 (Adam's first step is lr * sign).
        let mut p = param(1.0, 0.5);
        let mut opt = Optimizer::new(config(OptimizerKind::Adam), &p);
        opt.update(&mut p, 0.1);
        assert!((p[0].value[0] - 0.9).abs() < 1e-6, "{}", p[0].value[0]);
        // Step 2, g = 0.5 again: m = 0.095, v = 0.00049975, lr_t = 0.1*sqrt(1-0.998001)/(1-0.81)
        let lr_t = 0.1 * (1.0f64 - 0.999f64.powi(2)).sqrt() / (1.0 - 0.81);
        let want = 0.9 - lr_t * 0.095 / (0.00049975f64.sqrt() + 1e-8);
        opt.update(&mut p, 0.1);
        assert!((p[0].value[0] as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn sgd_momentum_and_decay_match_the_paper_rule() {
        let mut p = param(2.0, 0.5);
        let mut opt = Optimizer::new(config(OptimizerKind::Sgd), &p);
        opt.update(&mut p, 0.1);
        // v = -5e-4*0.1*2 - 0.1*0.5 = -0.0501; w = 1.9499
        assert!((p[0].value[0] - 1.9499).abs() < 1e-6);
        opt.update(&mut p, 0.1);
        // v = 0.9*-0.0501 - 5e-5*1.9499 - 0.05 = -0.095187495; w = 1.854712505
        assert!((p[0].value[0] - 1.854_712_5).abs() < 1e-6);
    }
}
