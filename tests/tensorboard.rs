//! The TensorBoard event files of real runs, read by TensorBoard's own event reader
//! (`EventAccumulator`, from the `tensorboard` package installed from PyPI into a throwaway
//! virtualenv): every tag, step and value, and a run killed and resumed without a step twice.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What TensorBoard's reader finds in `run` (see tests/support/tensorboard_check.py).
fn read_with_tensorboard(python: &Path, run: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tensorboard_check.py");
    let out = Command::new(python).arg(script).arg(run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn train_args(data: &Path, out: &Path, samples: usize) -> Vec<String> {
    let args = ["train", "--display-step", "2", "--histogram-every", "2", "--checkpoint-every", "4", "--samples"];
    let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    v.push(samples.to_string());
    v.extend(["--conv-algo", "im2col", "--eval-batch", "64", "--data"].map(String::from));
    v.extend([data.display().to_string(), "--out".into(), out.display().to_string()]);
    v
}

/// Every scalar tag at every display (train/*) or evaluation (test/*) step, each once, with
/// metrics.jsonl's values; histograms of each weight and gradient every 4 steps; the plots and
/// the first layer's kernels as images at the evaluation; the config as text.
fn check_run(report: &serde_json::Value, steps: u64) {
    let scalars = &report["scalars"];
    for tag in ["train/loss", "train/accuracy", "train/lr", "train/samples_per_s", "test/loss", "test/accuracy", "test/top5"] {
        assert!(scalars.get(tag).is_some(), "no {tag}: {report}");
    }
    for tag in ["train/loss", "train/accuracy", "train/lr", "train/samples_per_s", "test/loss", "test/accuracy"] {
        let s = &scalars[tag];
        assert_eq!(s["steps"], s["expected_steps"], "{tag}: the steps of metrics.jsonl, each once, in order");
        assert_eq!(s["mismatched"], 0, "{tag}: values differ from metrics.jsonl's");
    }
    let train_steps: Vec<u64> = (1..=steps / 2).map(|i| 2 * i).collect();
    assert_eq!(scalars["train/loss"]["steps"], serde_json::json!(train_steps));
    assert_eq!(scalars["test/accuracy"]["steps"], serde_json::json!([steps]));
    let histograms = report["histograms"].as_object().unwrap();
    assert_eq!(histograms.len(), 2 * 12, "weights and gradients of 12 parameters: {:?}", histograms.keys());
    let conv1 = &report["histograms"]["weights/conv1.weight"];
    let want: Vec<serde_json::Value> = (1..=steps / 4).map(|i| serde_json::json!([4 * i, 576.0])).collect();
    assert_eq!(conv1, &serde_json::json!(want), "conv1's 576 weights every 4 steps");
    for name in ["plots/loss", "plots/accuracy", "plots/confusion"] {
        assert_eq!(report["images"][name], serde_json::json!([[steps, 900, 560, 900, 560]]), "{name}: a 900x560 PNG");
    }
    assert_eq!(report["images"]["filters/first_layer"], serde_json::json!([[steps, 420, 420, 420, 420]]), "conv1's 64 kernels");
    let config = report["config_text"][0].as_str().unwrap();
    assert!(config.contains("\"model\": \"alexnet-mnist\"") && config.contains("\"histogram_every\": 2"), "{config}");
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: run `cargo test --release` (trains real models)")]
fn tensorboards_reader_sees_every_scalar_histogram_and_image_and_a_resumed_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(python) = support::python_with(dir.path(), &["tensorboard"]) else { return };
    let s = support::setup(1536, 64);
    // 24 steps of 64 in one go.
    let whole = s.root.join("whole");
    let done = Command::new(env!("CARGO_BIN_EXE_alexnet")).args(train_args(&s.data, &whole, 1536)).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(String::from_utf8_lossy(&done.stdout).contains("TensorBoard events: "));
    check_run(&read_with_tensorboard(&python, &whole), 24);

    // The same run killed (SIGKILL) some steps after a checkpoint, then resumed: the events
    // written after the checkpoint are written again, and TensorBoard sees each step once.
    let killed = s.root.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(train_args(&s.data, &killed, 1536))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let lines = || std::fs::read_to_string(killed.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
    while lines() < 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = Command::new(env!("CARGO_BIN_EXE_alexnet")).args(["train", "--resume"]).arg(&killed).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let report = read_with_tensorboard(&python, &killed);
    check_run(&report, 24);
    let files = std::fs::read_dir(&killed).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("tfevents")).count();
    assert!(files >= 2, "the resumed run appends a second event file");

    // --no-tensorboard writes none.
    let quiet = s.root.join("quiet");
    let mut args = train_args(&s.data, &quiet, 128);
    args.push("--no-tensorboard".into());
    let done = Command::new(env!("CARGO_BIN_EXE_alexnet")).args(&args).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(!std::fs::read_dir(&quiet).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains("tfevents")));
}
