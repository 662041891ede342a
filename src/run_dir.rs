//! A training run's directory: its config, per-step metrics, training checkpoint and model
//! file, locked for the life of the run. Only rank 0 of a data-parallel job has one; the
//! other ranks get `RunDir::none()`, which writes nothing.

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::files::{TEMP_PREFIX, write_atomic};
use crate::model::Model;
use crate::optim::Optimizer;
use crate::run_lock::{RunLock, lock_run_dir};
use crate::schedule::Plateau;
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The latest training state (model, optimiser, step), for `--resume`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The model alone, written at each epoch end and at the end of the run.
pub const MODEL_FILE: &str = "model.safetensors";

/// The config saved in a run directory.
pub fn read_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a run directory?)", path.display(), run_dir.display()))?;
    let mut cfg: TrainConfig = serde_json::from_str(&text).with_context(|| format!("{}: not a training config", path.display()))?;
    cfg.out = run_dir.to_path_buf();
    Ok(cfg)
}

/// Where a run starts: step 0, or a resumed run's checkpoint step, elapsed seconds and
/// schedule state.
#[derive(Default)]
pub struct Start {
    pub step: usize,
    pub elapsed: f64,
    pub plateau: Plateau,
}

pub struct RunDir {
    pub path: PathBuf,
    /// Rank 0's: the lock held until the run ends and the metrics file appended to.
    open: Option<(RunLock, File)>,
}

impl RunDir {
    /// A rank other than 0: writes nothing.
    pub fn none(path: &Path) -> RunDir {
        RunDir { path: path.to_path_buf(), open: None }
    }

    /// Refuse to start a new run where one already is (before any work).
    pub fn check_new(cfg: &TrainConfig) -> Result<()> {
        if cfg.out.join(CHECKPOINT_FILE).exists() {
            bail!(
                "{} already holds a training run ({CHECKPOINT_FILE}): continue it with `alexnet train --resume {}`, or pick another --out",
                cfg.out.display(),
                cfg.out.display()
            );
        }
        Ok(())
    }

    /// A new run's directory: created, locked, with the config and an empty metrics file.
    pub fn create(cfg: &TrainConfig) -> Result<RunDir> {
        std::fs::create_dir_all(&cfg.out).with_context(|| format!("cannot create run directory {}", cfg.out.display()))?;
        let lock = lock_run_dir(&cfg.out)?;
        write_atomic(&cfg.out.join(CONFIG_FILE), serde_json::to_string_pretty(cfg)?.as_bytes())?;
        write_atomic(&cfg.out.join(METRICS_FILE), b"")?;
        RunDir::open(&cfg.out, lock)
    }

    /// A resumed run's directory, locked: its checkpoint loaded into `model` and `opt`, the
    /// metrics written after that checkpoint dropped (they will be written again), and
    /// temporary files a killed write left behind removed.
    pub fn resume(cfg: &TrainConfig, model: &mut Model, opt: &mut Optimizer) -> Result<(RunDir, Start)> {
        let lock = lock_run_dir(&cfg.out)?;
        for entry in std::fs::read_dir(&cfg.out).with_context(|| format!("cannot read {}", cfg.out.display()))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let path = cfg.out.join(CHECKPOINT_FILE);
        let start = if path.exists() {
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            checkpoint::load_into(model, &path, &bytes, Some(opt))?;
            let meta = crate::files::metadata(&path, &bytes)?;
            let number = |key: &str| {
                meta.get(key).and_then(|v| v.parse::<f64>().ok()).with_context(|| format!("{}: no '{key}' metadata", path.display()))
            };
            Start { step: number("step")? as usize, elapsed: 0.0, plateau: Plateau::from_meta(&meta) }
        } else {
            println!("No checkpoint in {} yet: starting from step 0", cfg.out.display());
            Start::default()
        };
        let metrics_path = cfg.out.join(METRICS_FILE);
        let kept: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| s as usize <= start.step))
            .collect();
        write_atomic(&metrics_path, kept.iter().map(|v| format!("{v}\n")).collect::<String>().as_bytes())?;
        // The clock goes on from the last line kept. (It is not in the checkpoint, whose bytes
        // depend only on what was computed: two identical runs write identical files.)
        let elapsed = kept.iter().rev().find_map(|v| v["elapsed_s"].as_f64()).unwrap_or(0.0);
        Ok((RunDir::open(&cfg.out, lock)?, Start { elapsed, ..start }))
    }

    fn open(path: &Path, lock: RunLock) -> Result<RunDir> {
        let metrics_path = path.join(METRICS_FILE);
        let metrics =
            File::options().append(true).open(&metrics_path).with_context(|| format!("cannot open {}", metrics_path.display()))?;
        Ok(RunDir { path: path.to_path_buf(), open: Some((lock, metrics)) })
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.path.join(CHECKPOINT_FILE)
    }

    pub fn model_path(&self) -> PathBuf {
        self.path.join(MODEL_FILE)
    }

    /// Append one JSON object as a line of metrics.jsonl.
    pub fn log(&mut self, value: serde_json::Value) -> Result<()> {
        match &mut self.open {
            Some((_, f)) => writeln!(f, "{value}").context("cannot write metrics.jsonl"),
            None => Ok(()),
        }
    }

    /// The training checkpoint: model, optimiser state, step, seed and schedule.
    pub fn save_state(&self, model: &Model, opt: &Optimizer, step: usize, seed: u64, plateau: Plateau) -> Result<()> {
        if self.open.is_none() {
            return Ok(());
        }
        let mut meta = vec![("step", step.to_string()), ("seed", seed.to_string())];
        meta.extend(plateau.to_meta());
        checkpoint::save_training_state(model, opt, &self.checkpoint_path(), &meta)
    }

    /// The model file, with the step and test accuracy it was written at.
    pub fn save_model(&self, model: &Model, step: usize, test_accuracy: f32) -> Result<()> {
        if self.open.is_none() {
            return Ok(());
        }
        checkpoint::save(model, &self.model_path(), &[("step", step.to_string()), ("test_accuracy", test_accuracy.to_string())])
    }
}
