//! The training loop: the notebook's schedule (display every `display_step` steps, test at
//! each epoch end and at the end), with a run directory holding the config, per-step metrics
//! and the model.

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::batch::{epoch_order, fill_batch};
use crate::data::mnist::{self, Dataset, Split};
use crate::eval::{EvalResult, evaluate};
use crate::model::{Mode, Model, Workspace, architecture, forward, train_step_gradients};
use crate::optim::Optimizer;
use crate::rng::stream_id;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct TrainOutcome {
    pub test: EvalResult,
    pub model_path: PathBuf,
    pub seconds: f64,
}

/// Appends one JSON object per line to `metrics.jsonl`.
struct Metrics(File);

impl Metrics {
    fn log(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{value}").context("cannot write metrics.jsonl")
    }
}

pub fn load_data(cfg_data: Option<&Path>) -> Result<(Dataset, Dataset)> {
    let (dir, strict) = mnist::resolve_dir(cfg_data);
    Ok((mnist::load(&dir, Split::Train, strict)?, mnist::load(&dir, Split::Test, strict)?))
}

pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (train_set, test_set) = load_data(cfg.data.as_deref())?;
    let arch = architecture(&cfg.model, cfg.keep_prob)?;
    if [train_set.rows, train_set.cols, 1] != arch.input || [test_set.rows, test_set.cols, 1] != arch.input {
        bail!("model {} takes {:?} inputs but the data has {}x{} images", arch.name, arch.input, train_set.rows, train_set.cols);
    }
    let mut model = Model::new(&arch)?;
    model.init(cfg.seed, cfg.init_bias);
    let steps_per_epoch = train_set.len() / cfg.batch_size;
    if steps_per_epoch == 0 {
        bail!("--batch-size {} exceeds the {} training images", cfg.batch_size, train_set.len());
    }
    let total_steps = cfg.total_steps(train_set.len());

    std::fs::create_dir_all(&cfg.out).with_context(|| format!("cannot create run directory {}", cfg.out.display()))?;
    checkpoint::write_atomic(&cfg.out.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
    let metrics_path = cfg.out.join("metrics.jsonl");
    let mut metrics = Metrics(File::create(&metrics_path).with_context(|| format!("cannot create {}", metrics_path.display()))?);
    let model_path = cfg.out.join("model.safetensors");

    println!(
        "Training {} ({} parameters) on {} images for {total_steps} steps of {} ({} epochs), {} threads -> {}",
        arch.name,
        model.param_count(),
        train_set.len(),
        cfg.batch_size,
        format_args!("{:.2}", total_steps as f64 / steps_per_epoch as f64),
        rayon::current_num_threads(),
        cfg.out.display()
    );
    let mut ws = Workspace::new(&model, cfg.batch_size, true);
    let mut eval_ws = Workspace::new(&model, cfg.eval_batch.min(test_set.len()), false);
    let mut opt = Optimizer::new(cfg.optimizer_config(), &model.params);
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}").expect("valid template"));
    let mut labels = Vec::with_capacity(cfg.batch_size);
    let mut order = Vec::new();
    let started = Instant::now();
    let (mut window_start, mut window_samples) = (Instant::now(), 0usize);
    let mut last_test = None;
    for step in 1..=total_steps {
        let epoch = (step - 1) / steps_per_epoch;
        let pos = (step - 1) % steps_per_epoch;
        if pos == 0 {
            order = epoch_order(train_set.len(), cfg.seed, epoch as u64);
        }
        let indices = &order[pos * cfg.batch_size..(pos + 1) * cfg.batch_size];
        fill_batch(&train_set, indices, cfg.augment_shift, stream_id(&[cfg.seed, epoch as u64, 0x0041_5547]), ws.input_mut(), &mut labels);
        let (loss, _) = train_step_gradients(&mut model, &mut ws, &labels, stream_id(&[cfg.seed, step as u64]));
        if !loss.is_finite() {
            bail!("loss became {loss} at step {step}: training diverged; try a lower --lr (now {})", cfg.lr);
        }
        let lr = cfg.lr_at(epoch);
        opt.update(&mut model.params, lr);
        window_samples += cfg.batch_size;
        bar.inc(1);
        if step % cfg.display_step == 0 || step == total_steps {
            // The notebook reports the minibatch with dropout off (keep_prob 1).
            forward(&model, &mut ws, cfg.batch_size, Mode::Eval);
            let mut probs = vec![0.0; cfg.batch_size * model.classes()];
            let (loss, correct) = crate::layers::softmax::softmax_cross_entropy(
                ws.logits(cfg.batch_size, model.classes()),
                &labels,
                model.classes(),
                &mut probs,
                None,
            );
            let acc = correct as f32 / cfg.batch_size as f32;
            let rate = window_samples as f64 / window_start.elapsed().as_secs_f64();
            (window_start, window_samples) = (Instant::now(), 0);
            bar.set_message(format!("loss {loss:.4}  {rate:.0} samples/s"));
            bar.suspend(|| println!("Iter {}, Minibatch Loss= {loss:.6}, Training Accuracy= {acc:.5}", step * cfg.batch_size));
            metrics.log(json!({"step": step, "samples": step * cfg.batch_size, "epoch": epoch, "loss": loss, "accuracy": acc, "lr": lr.to_string().parse::<f64>().unwrap_or(lr as f64), "samples_per_s": rate}))?;
        }
        if pos + 1 == steps_per_epoch || step == total_steps {
            let t = Instant::now();
            let test = evaluate(&model, &mut eval_ws, &test_set);
            let epochs_done = step as f64 / steps_per_epoch as f64;
            let label = if pos + 1 == steps_per_epoch { format!("Epoch {}", epoch + 1) } else { format!("End, {epochs_done:.3} epochs") };
            bar.suspend(|| {
                println!(
                    "{label} (step {step}): test loss {:.4}, test accuracy {:.2}% ({:.1}s elapsed)",
                    test.loss,
                    100.0 * test.accuracy,
                    started.elapsed().as_secs_f64()
                )
            });
            metrics.log(json!({"step": step, "epoch": epochs_done, "test_loss": test.loss, "test_accuracy": test.accuracy, "elapsed_s": started.elapsed().as_secs_f64()}))?;
            let meta = [("step", step.to_string()), ("test_accuracy", test.accuracy.to_string())];
            checkpoint::save(&model, &model_path, &meta)?;
            window_start += t.elapsed();
            last_test = Some(test);
        }
    }
    bar.finish_and_clear();
    let test = last_test.expect("the last step evaluates");
    println!("Optimization Finished!");
    println!("Testing Accuracy: {:.4}", test.accuracy);
    println!("Model written to {}", model_path.display());
    Ok(TrainOutcome { test, model_path, seconds: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::tests::write_idx;
    use crate::optim::OptimizerKind;

    fn config(data: &Path, out: &Path) -> TrainConfig {
        TrainConfig {
            model: "alexnet-mnist".into(),
            batch_size: 8,
            samples: 48,
            epochs: None,
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            lr_step_epochs: None,
            lr_gamma: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            momentum: 0.9,
            weight_decay: 5e-4,
            keep_prob: 0.8,
            init_bias: 0.0,
            seed: 5,
            threads: rayon::current_num_threads(),
            augment_shift: 2,
            display_step: 2,
            eval_batch: 16,
            data: Some(data.to_path_buf()),
            out: out.to_path_buf(),
        }
    }

    #[test]
    fn same_seed_gives_bit_identical_runs_and_a_complete_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let labels: Vec<u8> = (0..32).map(|i| (i % 10) as u8).collect();
        write_idx(dir.path(), "train", 32, &labels);
        write_idx(dir.path(), "t10k", 32, &labels);
        let run = |name: &str, seed: u64| {
            let out = dir.path().join(name);
            let mut cfg = config(dir.path(), &out);
            cfg.seed = seed;
            train(&cfg).unwrap();
            let model = checkpoint::load(&out.join("model.safetensors"), None).unwrap();
            model.params.into_iter().map(|p| p.value).collect::<Vec<_>>()
        };
        let a = run("a", 5);
        assert!(a == run("b", 5), "same seed and threads: bit-identical weights");
        assert!(a != run("c", 6), "another seed, other weights");
        let metrics = std::fs::read_to_string(dir.path().join("a/metrics.jsonl")).unwrap();
        // 6 steps: display at 2, 4, 6; test evaluation at the epoch ends (4 steps of 8) and the end.
        assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 3);
        assert_eq!(metrics.lines().filter(|l| l.contains("\"test_accuracy\"")).count(), 2);
        let saved: TrainConfig = serde_json::from_str(&std::fs::read_to_string(dir.path().join("a/config.json")).unwrap()).unwrap();
        assert_eq!((saved.seed, saved.batch_size, saved.augment_shift), (5, 8, 2));
    }
}
