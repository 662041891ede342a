//! The training loop: the notebook's schedule (display every `display_step` steps, test at
//! each epoch end and at the end), with a run directory holding the config, per-step metrics,
//! training checkpoints and the model. A run can be stopped at any instant (SIGINT/SIGTERM
//! write a checkpoint first; even SIGKILL leaves the last one intact) and resumed bit for bit:
//! every random draw is keyed by (seed, epoch, step, ...) (see `rng`), so the step count,
//! the weights and the optimiser's slots are all the state there is.

use crate::architectures::architecture;
use crate::autotune::{self, RunPlans, plan_from_names};
use crate::checkpoint;
use crate::cluster::{Cluster, fingerprint};
use crate::config::TrainConfig;
use crate::data::folder::is_image_folder;
use crate::data::source::{OpenOptions, Source, prefetch};
use crate::eval::EvalResult;
use crate::model::{Mode, Model, Workspace, first_non_finite, forward, gradients_finite, train_step_gradients};
use crate::optim::Optimizer;
use crate::rng::stream_id;
use crate::run_lock::lock_run_dir;
use crate::schedule::Plateau;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The latest training state (model, optimiser, step), for `--resume`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The model alone, written at each epoch end and at the end of the run.
pub const MODEL_FILE: &str = "model.safetensors";

pub enum TrainOutcome {
    Finished {
        test: EvalResult,
        model_path: PathBuf,
        seconds: f64,
    },
    /// Finished on a data-parallel rank other than 0 (which alone evaluates and writes).
    FinishedWorker,
    /// Stopped by a signal (its number) after writing a checkpoint at `step`.
    Interrupted {
        signal: usize,
        step: usize,
    },
}

/// Appends one JSON object per line to `metrics.jsonl` (on rank 0; other ranks write nothing).
struct Metrics(Option<File>);

impl Metrics {
    fn log(&mut self, value: serde_json::Value) -> Result<()> {
        match &mut self.0 {
            Some(f) => writeln!(f, "{value}").context("cannot write metrics.jsonl"),
            None => Ok(()),
        }
    }
}

/// The config saved in a run directory.
pub fn read_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a run directory?)", path.display(), run_dir.display()))?;
    let mut cfg: TrainConfig = serde_json::from_str(&text).with_context(|| format!("{}: not a training config", path.display()))?;
    cfg.out = run_dir.to_path_buf();
    Ok(cfg)
}

pub fn signal_name(signal: usize) -> String {
    match signal {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// Plots are a view of the metrics: failing to draw them must not fail the run.
fn write_plots(run_dir: &Path) {
    match crate::plot::write_run_plots(run_dir) {
        Ok(paths) => println!("Plots: {}", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
        Err(e) => eprintln!("warning: no plots: {e:#}"),
    }
}

/// Where a resumed run starts: the checkpoint's step, elapsed seconds and schedule state.
#[derive(Default)]
struct Start {
    step: usize,
    elapsed: f64,
    plateau: Plateau,
}

/// Load the run directory's checkpoint into `model` and `opt`, drop the metrics written after
/// it (they will be written again), and clear temporary files a killed write left behind.
fn restore(cfg: &TrainConfig, model: &mut Model, opt: &mut Optimizer) -> Result<Start> {
    for entry in std::fs::read_dir(&cfg.out).with_context(|| format!("cannot read {}", cfg.out.display()))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(checkpoint::TEMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let path = cfg.out.join(CHECKPOINT_FILE);
    let start = if path.exists() {
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        checkpoint::load_into(model, &path, &bytes, Some(opt))?;
        let meta = checkpoint::metadata(&path, &bytes)?;
        let number = |key: &str| {
            meta.get(key).and_then(|v| v.parse::<f64>().ok()).with_context(|| format!("{}: no '{key}' metadata", path.display()))
        };
        Start { step: number("step")? as usize, elapsed: number("elapsed_s")?, plateau: Plateau::from_meta(&meta) }
    } else {
        println!("No checkpoint in {} yet: starting from step 0", cfg.out.display());
        Start::default()
    };
    let metrics_path = cfg.out.join(METRICS_FILE);
    let kept: String = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= start.step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_atomic(&metrics_path, kept.as_bytes())?;
    Ok(start)
}

/// Every rank takes rank 0's weights, optimiser state and starting point (fresh or resumed),
/// so the replicas start identical.
fn share_start(cluster: &mut dyn Cluster, model: &mut Model, opt: &mut Optimizer, start: &mut Start) -> Result<()> {
    for p in &mut model.params {
        cluster.broadcast_f32(&mut p.value, "rank 0's weights")?;
    }
    for slot in opt.slot1.iter_mut().chain(&mut opt.slot2) {
        cluster.broadcast_f32(slot, "rank 0's optimiser state")?;
    }
    let mut scalars = [start.step as f64, start.elapsed, opt.step as f64];
    cluster.broadcast_f64(&mut scalars, "rank 0's starting step")?;
    let [step, elapsed, opt_step] = scalars;
    (start.step, start.elapsed, opt.step) = (step as usize, elapsed, opt_step as u64);
    share_plateau(cluster, &mut start.plateau, "rank 0's schedule state")
}

/// Rank 0's plateau-schedule state on every rank (only rank 0 evaluates, so only it decides).
fn share_plateau(cluster: &mut dyn Cluster, plateau: &mut Plateau, what: &str) -> Result<()> {
    let mut state = [plateau.scale as f64, plateau.best_error as f64, plateau.stale_epochs as f64];
    cluster.broadcast_f64(&mut state, what)?;
    *plateau = Plateau { scale: state[0] as f32, best_error: state[1] as f32, stale_epochs: state[2] as usize };
    Ok(())
}

/// A signal on any rank stops every rank at the same step (`mpirun` may deliver it to them at
/// different instants); a rank that saw none reports SIGTERM, what `mpirun` forwards.
fn agree_on_stop(cluster: &mut dyn Cluster, signal: usize) -> Result<usize> {
    if cluster.ranks() == 1 {
        return Ok(signal);
    }
    let mut stopping = [(signal != 0) as u8 as f64];
    cluster.sum_f64(&mut stopping, "the stop check")?;
    Ok(if stopping[0] == 0.0 {
        0
    } else if signal != 0 {
        signal
    } else {
        15
    })
}

/// Train per `cfg`, or with `resume` continue the run in `cfg.out` from its checkpoint, as
/// one rank of `cluster` (`cluster::Single` for one process). `stop` is polled every step: a
/// non-zero value (a signal number) on any rank writes a checkpoint and returns `Interrupted`.
/// The run's convolution algorithms and where they came from: a resumed run reads the ones it
/// started with; a new run has rank 0 choose them (`autotune::choose`), save them in the run
/// directory and share them, so every rank runs the same arithmetic.
fn conv_plans(cfg: &TrainConfig, resume: bool, model: &Model, local_batch: usize, cluster: &mut dyn Cluster) -> Result<(RunPlans, String)> {
    let mut bytes = Vec::new();
    let mut source = String::from("rank 0's");
    if cluster.rank() == 0 {
        let plans = if resume && cfg.out.join(autotune::RUN_FILE).exists() {
            source = format!("as saved in {}", cfg.out.join(autotune::RUN_FILE).display());
            RunPlans::read(&cfg.out)?
        } else {
            let cache = cfg.resolved_cache_dir();
            let training = autotune::choose(model, local_batch, true, cfg.conv_algo, cache.as_deref())?;
            let evaluation = autotune::choose(model, cfg.eval_batch, false, cfg.conv_algo, cache.as_deref())?;
            source = training.source.clone();
            let plans = RunPlans {
                training_batch: local_batch,
                training: autotune::named_plan(model, &training.plan),
                evaluation_batch: cfg.eval_batch,
                evaluation: autotune::named_plan(model, &evaluation.plan),
            };
            plans.write(&cfg.out)?;
            plans
        };
        bytes = serde_json::to_vec(&plans)?;
    }
    if cluster.ranks() > 1 {
        // Measuring can take longer than --mpi-timeout (large layers, big evaluation batches):
        // the ranks meet without a deadline first, as after opening the data.
        cluster.rendezvous("rank 0 to choose the convolution algorithms")?;
    }
    cluster.broadcast_bytes(&mut bytes, "rank 0's convolution algorithms")?;
    Ok((serde_json::from_slice(&bytes).context("rank 0's convolution algorithms")?, source))
}

pub fn train(cfg: &TrainConfig, resume: bool, stop: &AtomicUsize, cluster: &mut dyn Cluster) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (rank, ranks) = (cluster.rank(), cluster.ranks());
    if ranks != cfg.ranks {
        bail!("the config is for {} ranks, this job has {ranks}", cfg.ranks);
    }
    // Rank 0 alone prints, evaluates and writes.
    let lead = rank == 0;
    let checkpoint_path = cfg.out.join(CHECKPOINT_FILE);
    if lead && !resume && checkpoint_path.exists() {
        bail!(
            "{} already holds a training run ({CHECKPOINT_FILE}): continue it with `alexnet train --resume {}`, or pick another --out",
            cfg.out.display(),
            cfg.out.display()
        );
    }
    let default_arch = architecture(&cfg.model, cfg.keep_prob, None)?;
    // A new ImageFolder dataset's statistics (mean image, colour PCA) take a pass over every
    // training image: rank 0 makes them first, so on shared storage the other ranks read its
    // cache instead of each making them again.
    let folder_first = ranks > 1 && !cfg.dummy && cfg.data.as_deref().is_some_and(is_image_folder);
    if folder_first && !lead {
        cluster.rendezvous("rank 0 to prepare the dataset's statistics")?;
    }
    let source = Arc::new(if cfg.dummy {
        Source::dummy(&default_arch)?
    } else {
        {
            let cache = cfg.resolved_cache_dir();
            let options = OpenOptions {
                shift: cfg.augment_shift,
                ten_crop: cfg.ten_crop,
                strict_images: cfg.strict_images,
                for_training: true,
                cache_dir: cache.as_deref(),
            };
            Source::open(cfg.data.as_deref(), &default_arch, &options)?
        }
    });
    if folder_first && lead {
        cluster.rendezvous("rank 0 to prepare the dataset's statistics")?;
    }
    let arch = architecture(&cfg.model, cfg.keep_prob, Some(source.classes()))?;
    let mut model = Model::new(&arch)?;
    model.init(cfg.seed, cfg.init_bias);
    let train_len = source.train_len();
    let steps_per_epoch = train_len / cfg.batch_size;
    if steps_per_epoch == 0 {
        bail!("--batch-size {} exceeds the {train_len} training images", cfg.batch_size);
    }
    let total_steps = cfg.total_steps(train_len);
    let mut opt = Optimizer::new(cfg.optimizer_config(), &model.params);

    // Rank 0 holds the run directory's lock until the run ends, however it ends.
    let mut _run_lock = None;
    let mut start = if !lead {
        Start::default()
    } else if resume {
        _run_lock = Some(lock_run_dir(&cfg.out)?);
        restore(cfg, &mut model, &mut opt)?
    } else {
        std::fs::create_dir_all(&cfg.out).with_context(|| format!("cannot create run directory {}", cfg.out.display()))?;
        _run_lock = Some(lock_run_dir(&cfg.out)?);
        checkpoint::write_atomic(&cfg.out.join(CONFIG_FILE), serde_json::to_string_pretty(cfg)?.as_bytes())?;
        checkpoint::write_atomic(&cfg.out.join(METRICS_FILE), b"")?;
        Start::default()
    };
    if ranks > 1 {
        // Opening the data may take any time (computing an ImageFolder's statistics): no
        // timeout applies until every rank has.
        cluster.rendezvous("every rank to open its data")?;
        share_start(cluster, &mut model, &mut opt, &mut start)?;
    }
    let metrics_path = cfg.out.join(METRICS_FILE);
    let mut metrics = Metrics(if lead {
        Some(File::options().append(true).open(&metrics_path).with_context(|| format!("cannot open {}", metrics_path.display()))?)
    } else {
        None
    });
    let model_path = cfg.out.join(MODEL_FILE);
    let say = |bar: &ProgressBar, line: String| {
        if lead {
            bar.suspend(|| println!("{line}"));
        }
    };
    let recovery_note = |saved_step: usize| {
        if saved_step == 0 {
            format!("No checkpoint had been written yet to {}.", cfg.out.display())
        } else {
            format!(
                "The last checkpoint ({}, step {saved_step}, on rank 0's machine) is valid: continue with `alexnet train --resume {}`.",
                checkpoint_path.display(),
                cfg.out.display()
            )
        }
    };
    cluster.set_recovery_note(recovery_note(start.step));

    let local_batch = cfg.batch_size / ranks;
    let shard = rank * local_batch..(rank + 1) * local_batch;
    let parallel = if ranks > 1 {
        let bytes: usize = model.params.iter().map(|p| p.value.len() * 4).sum();
        format!(
            ", data-parallel over {ranks} MPI ranks ({local_batch} samples each per step; {:.1} MB of gradients all-reduced per step)",
            bytes as f64 / 1e6
        )
    } else {
        String::new()
    };
    let bar = if lead { ProgressBar::new(total_steps as u64) } else { ProgressBar::hidden() };
    say(
        &bar,
        format!(
            "{} {} ({} parameters) on {} images for {total_steps} steps of {} ({} epochs), {} threads{parallel} -> {}",
            if start.step > 0 { format!("Resuming at step {} of", start.step) } else { "Training".into() },
            arch.name,
            model.param_count(),
            train_len,
            cfg.batch_size,
            format_args!("{:.2}", total_steps as f64 / steps_per_epoch as f64),
            rayon::current_num_threads(),
            cfg.out.display()
        ),
    );
    let (plans, plans_source) = conv_plans(cfg, resume, &model, local_batch, cluster)?;
    let train_plan = plan_from_names(&model, &plans.training);
    say(&bar, format!("Convolution algorithms for training ({plans_source}): {}", autotune::describe(&model, &train_plan)));
    let mut ws = Workspace::with_conv_plan(&model, local_batch, true, train_plan);
    let mut eval_ws = if lead {
        Workspace::with_conv_plan(&model, cfg.eval_batch, false, plan_from_names(&model, &plans.evaluation))
    } else {
        Workspace::new(&model, 1, false)
    };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}").expect("valid template"));
    bar.set_position(start.step as u64);
    let batches = prefetch(source.clone(), cfg.seed, cfg.batch_size, shard.clone(), model.input_len(), start.step + 1, total_steps);
    let started = Instant::now() - std::time::Duration::from_secs_f64(start.elapsed);
    let (mut window_start, mut window_samples, mut window_wait_start) = (Instant::now(), 0usize, 0.0);
    let mut last_test = None;
    let mut saved_step = start.step;
    let mut plateau = start.plateau;
    let save_state = |model: &Model, opt: &Optimizer, step: usize, plateau: Plateau| {
        if !lead {
            return Ok(());
        }
        let mut meta =
            vec![("step", step.to_string()), ("elapsed_s", started.elapsed().as_secs_f64().to_string()), ("seed", cfg.seed.to_string())];
        meta.extend(plateau.to_meta());
        checkpoint::save_training_state(model, opt, &checkpoint_path, &meta)
    };
    for step in start.step + 1..=total_steps {
        let epoch = (step - 1) / steps_per_epoch;
        let pos = (step - 1) % steps_per_epoch;
        let epoch_end = pos + 1 == steps_per_epoch;
        let (batch_input, labels) = batches.recv().context("the batch thread stopped")??;
        ws.input_mut().copy_from_slice(&batch_input);
        let mode = Mode::Train { stream: stream_id(&[cfg.seed, step as u64]), first_sample: shard.start };
        let (loss, _) = train_step_gradients(&mut model, &mut ws, &labels, mode, &mut *cluster);
        cluster.finish_gradients(&mut model.params)?;
        // The whole batch's loss: every rank makes the same divergence decision.
        let mut loss_sum = [loss as f64 * local_batch as f64];
        cluster.sum_f64(&mut loss_sum, "the step's loss")?;
        let loss = (loss_sum[0] / cfg.batch_size as f64) as f32;
        if !loss.is_finite() || !gradients_finite(&model) {
            // The weights are still the last good ones (the update has not run); on disk the
            // last checkpoint is kept as it is.
            bar.finish_and_clear();
            let place = match first_non_finite(&model, &ws, local_batch) {
                Some(place) if ranks > 1 => format!("{place} (on rank {rank})"),
                Some(place) => place,
                None if ranks > 1 => format!("not on rank {rank} (another rank's share of the batch)"),
                None => "an unlocated value".into(),
            };
            metrics.log(json!({"step": step, "diverged": place, "loss": loss.to_string()}))?;
            let kept = if saved_step > 0 {
                format!("the last good checkpoint ({}, step {saved_step}) is kept", checkpoint_path.display())
            } else {
                "no checkpoint had been written yet".into()
            };
            bail!(
                "training diverged at step {step} (loss {loss}): the first non-finite value is {place}; {kept}. Try a lower --lr (this run: {})",
                cfg.lr
            );
        }
        let lr = cfg.lr_at(epoch) * plateau.scale;
        opt.update(&mut model.params, lr);
        window_samples += cfg.batch_size;
        bar.set_position(step as u64);
        if step % cfg.display_step == 0 || step == total_steps {
            // The notebook reports the minibatch with dropout off (keep_prob 1).
            forward(&model, &mut ws, local_batch, Mode::Eval);
            let mut probs = vec![0.0; local_batch * model.classes()];
            let (loss, correct) = crate::layers::softmax::softmax_cross_entropy(
                ws.logits(local_batch, model.classes()),
                &labels,
                model.classes(),
                &mut probs,
                None,
            );
            let mut sums = [loss as f64 * local_batch as f64, correct as f64];
            cluster.sum_f64(&mut sums, "the minibatch accuracy")?;
            let loss = (sums[0] / cfg.batch_size as f64) as f32;
            let acc = (sums[1] / cfg.batch_size as f64) as f32;
            let window_s = window_start.elapsed().as_secs_f64();
            let rate = window_samples as f64 / window_s;
            // The share of the window spent waiting for gradients backward did not hide.
            let wait_s = cluster.gradient_wait_seconds();
            let comm_wait = (wait_s - window_wait_start) / window_s;
            window_wait_start = wait_s;
            (window_start, window_samples) = (Instant::now(), 0);
            bar.set_message(format!("loss {loss:.4}  {rate:.0} samples/s"));
            say(&bar, format!("Iter {}, Minibatch Loss= {loss:.6}, Training Accuracy= {acc:.5}", step * cfg.batch_size));
            let mut line = json!({"step": step, "samples": step * cfg.batch_size, "epoch": epoch, "loss": loss, "accuracy": acc, "lr": lr.to_string().parse::<f64>().unwrap_or(lr as f64), "samples_per_s": rate});
            if ranks > 1 {
                line["gradient_wait_fraction"] = json!(comm_wait);
            }
            metrics.log(line)?;
        }
        let t = Instant::now();
        if lead && (epoch_end || step == total_steps) {
            let test = source.evaluate(&model, &mut eval_ws)?;
            let epochs_done = step as f64 / steps_per_epoch as f64;
            let label = if epoch_end { format!("Epoch {}", epoch + 1) } else { format!("End, {epochs_done:.3} epochs") };
            let split = source.eval_split();
            let top5 = if model.classes() > 5 { format!(" (top-5 {:.2}%)", 100.0 * test.top5_accuracy) } else { String::new() };
            say(
                &bar,
                format!(
                    "{label} (step {step}): {split} loss {:.4}, {split} accuracy {:.2}%{top5} ({:.1}s elapsed)",
                    test.loss,
                    100.0 * test.accuracy,
                    started.elapsed().as_secs_f64()
                ),
            );
            if let (Some(patience), true) = (cfg.lr_plateau_patience, epoch_end)
                && plateau.epoch_end(1.0 - test.accuracy, patience, cfg.lr_gamma)
            {
                say(&bar, format!("No improvement for {patience} epochs: learning rate now {}", cfg.lr * plateau.scale));
            }
            metrics.log(json!({"step": step, "samples": step * cfg.batch_size, "epoch": epochs_done, "test_loss": test.loss, "test_accuracy": test.accuracy, "confusion": test.confusion, "elapsed_s": started.elapsed().as_secs_f64()}))?;
            checkpoint::save(&model, &model_path, &[("step", step.to_string()), ("test_accuracy", test.accuracy.to_string())])?;
            last_test = Some(test);
        }
        if ranks > 1 && epoch_end && cfg.lr_plateau_patience.is_some() {
            share_plateau(cluster, &mut plateau, "rank 0's evaluation")?;
        }
        let signal = agree_on_stop(cluster, stop.load(Ordering::SeqCst))?;
        if signal != 0 || epoch_end || step == total_steps || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0) {
            save_state(&model, &opt, step, plateau)?;
            saved_step = step;
            cluster.set_recovery_note(recovery_note(step));
            if !cluster.all_equal(fingerprint(&model.params), "the replicas' weight fingerprints")? {
                bail!("step {step}: the ranks' weights differ (they must stay identical); the checkpoint is rank 0's");
            }
        }
        window_start += t.elapsed();
        if signal != 0 && step < total_steps {
            bar.finish_and_clear();
            if !lead {
                return Ok(TrainOutcome::Interrupted { signal, step });
            }
            println!(
                "Interrupted by {} at step {step} of {total_steps}: checkpoint written to {}. Continue with: alexnet train --resume {}",
                signal_name(signal),
                checkpoint_path.display(),
                cfg.out.display()
            );
            write_plots(&cfg.out);
            return Ok(TrainOutcome::Interrupted { signal, step });
        }
    }
    bar.finish_and_clear();
    if !lead {
        return Ok(TrainOutcome::FinishedWorker);
    }
    let test = match last_test {
        Some(t) => t,
        None => {
            println!("The run had already finished; evaluating its model");
            source.evaluate(&model, &mut eval_ws)?
        }
    };
    if !model_path.exists() {
        checkpoint::save(&model, &model_path, &[("step", total_steps.to_string()), ("test_accuracy", test.accuracy.to_string())])?;
    }
    write_plots(&cfg.out);
    println!("Optimization Finished!");
    println!("Testing Accuracy: {:.4}", test.accuracy);
    println!("Model written to {}", model_path.display());
    Ok(TrainOutcome::Finished { test, model_path, seconds: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autotune::ConvAlgoPolicy;
    use crate::cluster::Single;
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
            lr_plateau_patience: None,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            momentum: 0.9,
            weight_decay: 5e-4,
            keep_prob: 0.8,
            init_bias: 0.0,
            seed: 5,
            threads: rayon::current_num_threads(),
            ranks: 1,
            augment_shift: 2,
            display_step: 2,
            checkpoint_every: 500,
            eval_batch: 16,
            ten_crop: false,
            strict_images: false,
            dummy: false,
            data: Some(data.to_path_buf()),
            out: out.to_path_buf(),
            conv_algo: ConvAlgoPolicy::Auto,
            // Measured choices are cached beside the test's runs, not in the user's cache.
            cache_dir: out.parent().map(|d| d.join("conv-cache")),
        }
    }

    /// 32 synthetic training and test images in a temporary directory.
    fn tiny_dataset() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let labels: Vec<u8> = (0..32).map(|i| (i % 10) as u8).collect();
        write_idx(dir.path(), "train", 32, &labels);
        write_idx(dir.path(), "t10k", 32, &labels);
        dir
    }

    #[test]
    fn same_seed_gives_bit_identical_runs_and_a_complete_run_directory() {
        let dir = tiny_dataset();
        let run = |name: &str, seed: u64| {
            let out = dir.path().join(name);
            let mut cfg = config(dir.path(), &out);
            cfg.seed = seed;
            train(&cfg, false, &AtomicUsize::new(0), &mut Single).unwrap();
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

    #[test]
    fn divergence_stops_the_run_naming_step_and_layer_and_keeps_the_last_good_checkpoint() {
        let dir = tiny_dataset();
        let out = dir.path().join("run");
        let mut cfg = config(dir.path(), &out);
        // Adam moves every weight by ~lr per step: 1e12 overflows f32 within two steps.
        (cfg.lr, cfg.checkpoint_every, cfg.samples) = (1e12, 1, 80);
        let err = format!("{:#}", train(&cfg, false, &AtomicUsize::new(0), &mut Single).err().expect("the run diverges"));
        assert!(err.contains("diverged at step 2") && err.contains("the first non-finite value is the output of"), "{err}");
        assert!(err.contains("step 1) is kept") && err.contains("--lr"), "{err}");
        // The checkpoint on disk is step 1's, finite (the loader rejects non-finite tensors).
        let bytes = std::fs::read(out.join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(checkpoint::metadata(&out.join(CHECKPOINT_FILE), &bytes).unwrap()["step"], "1");
        checkpoint::load(&out.join(CHECKPOINT_FILE), None).unwrap();
        let metrics = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap();
        assert!(metrics.contains("\"diverged\""), "{metrics}");
    }

    #[test]
    fn a_fresh_run_refuses_a_directory_holding_a_run_and_resume_needs_a_run_directory() {
        let dir = tiny_dataset();
        let out = dir.path().join("run");
        let cfg = config(dir.path(), &out);
        train(&cfg, false, &AtomicUsize::new(0), &mut Single).unwrap();
        let err = format!("{:#}", train(&cfg, false, &AtomicUsize::new(0), &mut Single).err().unwrap());
        assert!(err.contains("--resume") && err.contains("already holds a training run"), "{err}");
        let err = format!("{:#}", read_config(dir.path()).unwrap_err());
        assert!(err.contains("config.json") && err.contains("run directory"), "{err}");
        // Resuming a finished run re-evaluates its model and changes nothing.
        let before = std::fs::read(out.join(CHECKPOINT_FILE)).unwrap();
        assert!(matches!(
            train(&read_config(&out).unwrap(), true, &AtomicUsize::new(0), &mut Single).unwrap(),
            TrainOutcome::Finished { .. }
        ));
        assert_eq!(before, std::fs::read(out.join(CHECKPOINT_FILE)).unwrap());
    }

    #[test]
    fn a_stop_request_writes_a_checkpoint_that_holds_the_optimizer_state() {
        let dir = tiny_dataset();
        let out = dir.path().join("run");
        let cfg = config(dir.path(), &out);
        // Stop requested before the first step: the run stops after it.
        let outcome = train(&cfg, false, &AtomicUsize::new(15), &mut Single).unwrap();
        assert!(matches!(outcome, TrainOutcome::Interrupted { signal: 15, step: 1 }));
        let path = out.join(CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).unwrap();
        let arch = architecture(&cfg.model, cfg.keep_prob, None).unwrap();
        let mut model = Model::new(&arch).unwrap();
        let mut opt = Optimizer::new(cfg.optimizer_config(), &model.params);
        checkpoint::load_into(&mut model, &path, &bytes, Some(&mut opt)).unwrap();
        assert_eq!(opt.step, 1);
        assert!(opt.slot1.iter().chain(&opt.slot2).all(|s| s.iter().any(|&v| v != 0.0)), "Adam's moments were saved");
        // A model-only file is not a training checkpoint.
        let model_only = out.join("model-only.safetensors");
        checkpoint::save(&model, &model_only, &[]).unwrap();
        let err =
            checkpoint::load_into(&mut model, &model_only, &std::fs::read(&model_only).unwrap(), Some(&mut opt)).unwrap_err().to_string();
        assert!(err.contains("no optimizer state") && err.contains("missing tensor optimizer.slot1.conv1.weight"), "{err}");
    }

    #[test]
    fn each_imagenet_model_learns_a_generated_image_folder_far_above_chance() {
        if cfg!(debug_assertions) {
            eprintln!("skipped: run `cargo test --release` (trains three 60M-parameter models)");
            return;
        }
        // Three colour classes, JPEG and PNG at varied sizes: 120 training images, 12 val.
        let dir = tempfile::tempdir().unwrap();
        crate::data::folder::tests::write_colour_folder(dir.path(), 3, 40, 4);
        for (model, ten_crop) in [("alexnet", false), ("alexnet-2gpu", false), ("alexnet-owt", true)] {
            let out = dir.path().join(model);
            let mut cfg = config(dir.path(), &out);
            (cfg.model, cfg.lr, cfg.keep_prob, cfg.augment_shift) = (model.into(), 1e-4, 0.5, 0);
            // One epoch of 30 steps of 4 (the paper's lr 0.01 is for batches of 128).
            (cfg.batch_size, cfg.epochs, cfg.eval_batch, cfg.ten_crop, cfg.checkpoint_every) = (4, Some(1), 4, ten_crop, 0);
            let TrainOutcome::Finished { test, model_path, .. } = train(&cfg, false, &AtomicUsize::new(0), &mut Single).unwrap() else {
                panic!("interrupted")
            };
            assert_eq!((test.samples, test.confusion.len()), (12, 3));
            assert!(test.accuracy >= 0.9, "{model}: validation top-1 {} (chance 0.33)", test.accuracy);
            assert_eq!(test.top5_accuracy, 1.0, "3 classes are always in the top five");
            let m = checkpoint::load(&model_path, None).unwrap();
            assert_eq!((m.arch.name.as_str(), m.classes()), (model, 3));
        }
    }

    #[test]
    fn dummy_data_trains_without_a_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut cfg = config(Path::new("/nonexistent"), &out);
        (cfg.dummy, cfg.samples, cfg.eval_batch) = (true, 16, 64);
        let TrainOutcome::Finished { test, .. } = train(&cfg, false, &AtomicUsize::new(0), &mut Single).unwrap() else {
            panic!("interrupted")
        };
        assert_eq!((test.samples, test.confusion.len()), (256, 10));
        let source = Source::dummy(&architecture("alexnet", 0.5, Some(7)).unwrap()).unwrap();
        assert_eq!((source.classes(), source.train_len()), (7, 1_281_167));
        let (mut a, mut b, mut labels) = (vec![0.0; 2 * 227 * 227 * 3], vec![0.0; 2 * 227 * 227 * 3], Vec::new());
        source.fill_train(&[3, 9], 1, 0, &mut a, &mut labels).unwrap();
        assert_eq!(labels, [3, 2]);
        source.fill_train(&[3, 9], 2, 5, &mut b, &mut labels).unwrap();
        assert_eq!(a, b, "a dummy image depends only on its index");
    }
}
