//! The state of a training run and the four things the loop does with it: a training step,
//! a progress report, an evaluation and a checkpoint.

use super::ranks::{check_replicas, share_plateau};
use crate::cluster::Cluster;
use crate::config::TrainConfig;
use crate::data::source::Source;
use crate::eval::{EvalResult, evaluate_source};
use crate::layers::softmax::softmax_cross_entropy;
use crate::model::{Mode, Model, Workspace, first_non_finite, forward, gradients_finite, train_step_gradients};
use crate::optim::Optimizer;
use crate::rng::stream_id;
use crate::run_dir::RunDir;
use crate::schedule::Plateau;
use crate::tensorboard::EventWriter;
use anyhow::Result;
use indicatif::ProgressBar;
use serde_json::json;
use std::ops::Range;
use std::time::{Duration, Instant};

pub struct Trainer<'a> {
    pub cfg: &'a TrainConfig,
    pub model: Model,
    pub opt: Optimizer,
    /// The training workspace (this rank's share of the batch) and the evaluation one.
    pub ws: Workspace,
    pub eval_ws: Workspace,
    pub source: std::sync::Arc<Source>,
    pub cluster: &'a mut dyn Cluster,
    pub run: RunDir,
    pub bar: ProgressBar,
    pub plateau: Plateau,
    /// This rank's samples of each batch.
    pub shard: Range<usize>,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    /// When the run started, counting the time before a resume.
    pub started: Instant,
    /// The last step with a checkpoint on disk.
    pub saved_step: usize,
    /// The last evaluation's results.
    pub last_test: Option<EvalResult>,
    /// Samples/s over the steps since the last report, less evaluation and checkpoint time.
    pub window: RateWindow,
    /// Rank 0's TensorBoard events (unless --no-tensorboard), and the time spent on them.
    pub tensorboard: Option<EventWriter>,
    pub tensorboard_seconds: f64,
}

pub struct RateWindow {
    start: Instant,
    samples: usize,
    /// `Cluster::gradient_wait_seconds` at the window's start.
    wait_start: f64,
}

impl RateWindow {
    pub fn new() -> RateWindow {
        RateWindow { start: Instant::now(), samples: 0, wait_start: 0.0 }
    }
}

impl Trainer<'_> {
    /// Rank 0 alone prints, evaluates and writes.
    pub fn lead(&self) -> bool {
        self.cluster.rank() == 0
    }

    fn say(&self, line: String) {
        if self.lead() {
            self.bar.suspend(|| println!("{line}"));
        }
    }

    fn local_batch(&self) -> usize {
        self.shard.len()
    }

    /// One optimiser step on this batch: forward, backward, the gradients summed over the
    /// ranks, then the update. A non-finite loss or gradient stops the run with where it first
    /// appeared, before the update, so the weights and the last checkpoint stay good.
    pub fn step(&mut self, step: usize, input: &[f32], labels: &[u32]) -> Result<()> {
        let cfg = self.cfg;
        self.ws.input_mut().copy_from_slice(input);
        let mode = Mode::Train { stream: stream_id(&[cfg.seed, step as u64]), first_sample: self.shard.start, keep: cfg.keep_prob };
        let (loss, _) = train_step_gradients(&mut self.model, &mut self.ws, labels, mode, &mut *self.cluster);
        self.cluster.finish_gradients(&mut self.model.params)?;
        // The whole batch's loss: every rank makes the same divergence decision.
        let mut loss_sum = [loss as f64 * self.local_batch() as f64];
        self.cluster.sum_f64(&mut loss_sum, "the step's loss")?;
        let loss = (loss_sum[0] / cfg.batch_size as f64) as f32;
        if !loss.is_finite() || !gradients_finite(&self.model) {
            return Err(self.diverged(step, loss));
        }
        let lr = self.lr(step);
        self.opt.update(&mut self.model.params, lr);
        self.window.samples += cfg.batch_size;
        self.bar.set_position(step as u64);
        Ok(())
    }

    /// The learning rate of `step`: the step schedule's, scaled by the plateau schedule.
    fn lr(&self, step: usize) -> f32 {
        self.cfg.lr_at((step - 1) / self.steps_per_epoch) * self.plateau.scale
    }

    fn diverged(&mut self, step: usize, loss: f32) -> anyhow::Error {
        self.bar.finish_and_clear();
        let (rank, ranks) = (self.cluster.rank(), self.cluster.ranks());
        let place = match first_non_finite(&self.model, &self.ws, self.local_batch()) {
            Some(place) if ranks > 1 => format!("{place} (on rank {rank})"),
            Some(place) => place,
            None if ranks > 1 => format!("not on rank {rank} (another rank's share of the batch)"),
            None => "an unlocated value".into(),
        };
        if let Err(e) = self.run.log(json!({"step": step, "diverged": place, "loss": loss.to_string()})) {
            return e;
        }
        let kept = if self.saved_step > 0 {
            format!("the last good checkpoint ({}, step {}) is kept", self.run.checkpoint_path().display(), self.saved_step)
        } else {
            "no checkpoint had been written yet".into()
        };
        anyhow::anyhow!(
            "training diverged at step {step} (loss {loss}): the first non-finite value is {place}; {kept}. Try a lower --lr (this run: {})",
            self.cfg.lr
        )
    }

    /// The notebook's display line: the minibatch's loss and accuracy with dropout off (its
    /// keep_prob 1), and a metrics line with the learning rate and samples/s.
    pub fn report(&mut self, step: usize, labels: &[u32]) -> Result<()> {
        let (cfg, n, classes) = (self.cfg, self.local_batch(), self.model.classes());
        forward(&self.model, &mut self.ws, n, Mode::Eval);
        let mut probs = vec![0.0; n * classes];
        let (loss, correct) = softmax_cross_entropy(self.ws.logits(n, classes), labels, classes, &mut probs, None);
        let mut sums = [loss as f64 * n as f64, correct as f64];
        self.cluster.sum_f64(&mut sums, "the minibatch accuracy")?;
        let loss = (sums[0] / cfg.batch_size as f64) as f32;
        let acc = (sums[1] / cfg.batch_size as f64) as f32;
        let window_s = self.window.start.elapsed().as_secs_f64();
        let rate = self.window.samples as f64 / window_s;
        // The share of the window spent waiting for gradients backward did not hide.
        let wait_s = self.cluster.gradient_wait_seconds();
        let comm_wait = (wait_s - self.window.wait_start) / window_s;
        self.window = RateWindow { start: Instant::now(), samples: 0, wait_start: wait_s };
        self.bar.set_message(format!("loss {loss:.4}  {rate:.0} samples/s"));
        self.say(format!("Iter {}, Minibatch Loss= {loss:.6}, Training Accuracy= {acc:.5}", step * cfg.batch_size));
        let lr = self.lr(step);
        let epoch = (step - 1) / self.steps_per_epoch;
        let mut line = json!({"step": step, "samples": step * cfg.batch_size, "epoch": epoch, "loss": loss, "accuracy": acc, "lr": lr.to_string().parse::<f64>().unwrap_or(lr as f64), "samples_per_s": rate, "elapsed_s": self.started.elapsed().as_secs_f64()});
        if self.cluster.ranks() > 1 {
            line["gradient_wait_fraction"] = json!(comm_wait);
        }
        self.run.log(line)?;
        if let Some(tb) = &mut self.tensorboard {
            let t = Instant::now();
            let scalars =
                [("train/loss", loss as f64), ("train/accuracy", acc as f64), ("train/lr", lr as f64), ("train/samples_per_s", rate)];
            tb.scalars(step, &scalars);
            if cfg.histogram_every > 0 && step.is_multiple_of(cfg.display_step * cfg.histogram_every) {
                let params = &self.model.params;
                let weights = params.iter().map(|p| (format!("weights/{}", p.name), &p.value[..]));
                tb.histograms(step, weights.chain(params.iter().map(|p| (format!("gradients/{}", p.name), &p.grad[..]))));
            }
            tb.flush()?;
            self.tensorboard_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Test (or validation) loss and accuracy on rank 0, the plateau schedule's epoch-end
    /// decision shared with every rank, and the model file written.
    pub fn evaluate(&mut self, step: usize) -> Result<()> {
        let cfg = self.cfg;
        let epoch_end = step.is_multiple_of(self.steps_per_epoch);
        if self.lead() {
            let test = evaluate_source(&self.model, &mut self.eval_ws, &self.source)?;
            let epochs_done = step as f64 / self.steps_per_epoch as f64;
            let label = if epoch_end { format!("Epoch {}", step / self.steps_per_epoch) } else { format!("End, {epochs_done:.3} epochs") };
            let split = self.source.eval_split();
            let top5 = if self.model.classes() > 5 { format!(" (top-5 {:.2}%)", 100.0 * test.top5_accuracy) } else { String::new() };
            let elapsed = self.started.elapsed().as_secs_f64();
            self.say(format!(
                "{label} (step {step}): {split} loss {:.4}, {split} accuracy {:.2}%{top5} ({elapsed:.1}s elapsed)",
                test.loss,
                100.0 * test.accuracy
            ));
            if let (Some(patience), true) = (cfg.lr_plateau_patience, epoch_end)
                && self.plateau.epoch_end(1.0 - test.accuracy, patience, cfg.lr_gamma)
            {
                self.say(format!("No improvement for {patience} epochs: learning rate now {}", cfg.lr * self.plateau.scale));
            }
            self.run.log(json!({"step": step, "samples": step * cfg.batch_size, "epoch": epochs_done, "test_loss": test.loss, "test_accuracy": test.accuracy, "confusion": test.confusion, "elapsed_s": elapsed}))?;
            self.run.save_model(&self.model, step, test.accuracy)?;
            if let Some(tb) = &mut self.tensorboard {
                let t = Instant::now();
                let scalars =
                    [("test/loss", test.loss as f64), ("test/accuracy", test.accuracy as f64), ("test/top5", test.top5_accuracy as f64)];
                tb.scalars(step, &scalars);
                // The plots are a view of the metrics: failing to draw them must not fail the run.
                match crate::plot::run_plots(&self.run.path) {
                    Ok(plots) => plots.into_iter().for_each(|(name, png)| tb.image(step, &format!("plots/{name}"), png, crate::plot::SIZE)),
                    Err(e) => eprintln!("warning: no plots for TensorBoard: {e:#}"),
                }
                // The first layer's kernels, where they make a picture (1 or 3 input channels).
                if let Ok((png, size)) = crate::plot::filters_png(&self.model) {
                    tb.image(step, "filters/first_layer", png, size);
                }
                tb.flush()?;
                self.tensorboard_seconds += t.elapsed().as_secs_f64();
            }
            self.last_test = Some(test);
        }
        if epoch_end && cfg.lr_plateau_patience.is_some() {
            share_plateau(&mut *self.cluster, &mut self.plateau, "rank 0's evaluation")?;
        }
        Ok(())
    }

    /// The training checkpoint (rank 0's), after checking that the replicas still agree.
    pub fn checkpoint(&mut self, step: usize) -> Result<()> {
        self.run.save_state(&self.model, &self.opt, step, self.cfg.seed, self.plateau)?;
        self.saved_step = step;
        self.cluster.set_recovery_note(recovery_note(&self.run, step));
        check_replicas(&mut *self.cluster, &self.model, step)
    }

    /// Leave `time` (evaluation, checkpoints) out of the samples/s the next report prints.
    pub fn exclude_from_rate(&mut self, time: Duration) {
        self.window.start += time;
    }
}

/// What the user can do when the job dies now: resume from the last checkpoint, if any.
pub fn recovery_note(run: &RunDir, saved_step: usize) -> String {
    if saved_step == 0 {
        format!("No checkpoint had been written yet to {}.", run.path.display())
    } else {
        format!(
            "The last checkpoint ({}, step {saved_step}, on rank 0's machine) is valid: continue with `alexnet train --resume {}`.",
            run.checkpoint_path().display(),
            run.path.display()
        )
    }
}
