//! The exported ONNX graph, run by onnxruntime (installed from PyPI into a throwaway
//! virtualenv), gives our outputs on 1,000 real MNIST test images within 1e-4.

use alexnet::checkpoint;
use alexnet::data::mnist::{self, Split};
use alexnet::model::{Mode, Workspace, forward};
use std::path::Path;
use std::process::Command;

fn alexnet(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn write_f32(path: &Path, values: &[f32]) {
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

/// A virtualenv with onnxruntime, or why there is none.
fn onnxruntime_venv(dir: &Path) -> Result<std::path::PathBuf, String> {
    let venv = dir.join("venv");
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().map_err(|e| format!("no python3 ({e})"))?;
    if !made.status.success() {
        return Err(format!("python3 -m venv failed: {}", String::from_utf8_lossy(&made.stderr)));
    }
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "onnxruntime", "numpy"])
        .output()
        .map_err(|e| format!("cannot run pip ({e})"))?;
    if !pip.status.success() {
        return Err(format!("pip cannot install onnxruntime (no registry?): {}", String::from_utf8_lossy(&pip.stderr).trim()));
    }
    Ok(venv.join("bin/python"))
}

#[test]
fn onnxruntime_matches_our_outputs_on_1000_test_images() {
    if cfg!(debug_assertions) {
        eprintln!("skipped: run `cargo test --release` (this test trains a model first)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let python = match onnxruntime_venv(dir.path()) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED onnxruntime check: {why}");
            return;
        }
    };
    let run = dir.path().join("run");
    alexnet(&["train", "--samples", "3200", "--display-step", "1000", "--out", run.to_str().unwrap()]);
    let model_path = run.join("model.safetensors");
    let onnx = dir.path().join("model.onnx");
    alexnet(&["export", "--checkpoint", model_path.to_str().unwrap(), "--onnx", onnx.to_str().unwrap()]);

    let model = checkpoint::load(&model_path, None).unwrap();
    let test = mnist::load(&mnist::default_dir(), Split::Test, true).unwrap();
    let n = 1000;
    let mut ws = Workspace::new(&model, n, false);
    ws.input_mut().copy_from_slice(&test.images[..n * 784]);
    forward(&model, &mut ws, n, Mode::Eval);
    // One channel: NHWC and ONNX's NCHW are the same bytes.
    let (inputs, logits) = (dir.path().join("inputs.f32"), dir.path().join("logits.f32"));
    write_f32(&inputs, &test.images[..n * 784]);
    write_f32(&logits, ws.logits(n, 10));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/onnx_check.py");
    let out = Command::new(python).arg(script).args([&onnx, &inputs, &logits]).args(["1000", "1", "28", "28", "10"]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("onnxruntime vs alexnet: {report}");
    assert!(out.status.success(), "{report} {}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("\"same_predictions\": 1000"), "{report}");
}
