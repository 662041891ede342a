//! The exported ONNX graph, run by onnxruntime (installed from PyPI into a throwaway
//! virtualenv), gives our outputs on 1,000 real MNIST test images within 1e-4 of the largest
//! logit (`tests/support/onnx_check.py`).

mod support;

use alexnet::architectures::{architecture, with_input_size};
use alexnet::checkpoint;
use alexnet::data::mnist::Dataset;
use alexnet::data::mnist::{self, Split};
use alexnet::model::{Mode, Model, Workspace, forward};
use std::path::Path;
use std::process::Command;

fn alexnet(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn write_f32(path: &Path, values: &[f32]) {
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: run `cargo test --release` (this test trains a model first)")]
fn onnxruntime_matches_our_outputs_on_1000_test_images() {
    let dir = tempfile::tempdir().unwrap();
    let Some(python) = support::python_with(dir.path(), &["onnxruntime", "numpy"]) else { return };
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

    // Every other model, freshly initialised, on random 3-channel images: grouped convs (the
    // two towers), VALID pooling, the paper's LRN and torchvision's padding all map exactly;
    // alexnet-owt also at 63x63 and 256x256, where its adaptive pooling repeats a 1x1 map and
    // averages a 7x7 one into 6x6 (an identity at 224).
    for (name, side) in
        [("alexnet", None), ("alexnet-2gpu", None), ("alexnet-owt", None), ("alexnet-owt", Some(63)), ("alexnet-owt", Some(256))]
    {
        let mut model = Model::new(&with_input_size(architecture(name, Some(10)).unwrap(), side).unwrap()).unwrap();
        model.init(3, 0.0);
        let name = format!("{name}-{}", model.arch.input[0]);
        let path = dir.path().join(format!("{name}.safetensors"));
        checkpoint::save(&model, &path, &[]).unwrap();
        let onnx = dir.path().join(format!("{name}.onnx"));
        alexnet(&["export", "--checkpoint", path.to_str().unwrap(), "--onnx", onnx.to_str().unwrap()]);
        let (n, [h, w, c]) = (2, model.arch.input);
        let images = Dataset::dummy(n, model.arch.input, 10);
        let mut ws = Workspace::new(&model, n, false);
        // Scaled like real inputs (0-255 minus the mean for the paper's models).
        let x: Vec<f32> = images.images.iter().map(|v| v * 60.0 * model.arch.input_scale).collect();
        ws.input_mut().copy_from_slice(&x);
        forward(&model, &mut ws, n, Mode::Eval);
        // Ours is NHWC, ONNX's NCHW.
        let nchw: Vec<f32> = (0..n * c * h * w)
            .map(|i| {
                let (s, ch, y, xx) = (i / (c * h * w), (i / (h * w)) % c, (i / w) % h, i % w);
                x[((s * h + y) * w + xx) * c + ch]
            })
            .collect();
        write_f32(&inputs, &nchw);
        write_f32(&logits, ws.logits(n, 10));
        let dims = [n, c, h, w, 10].map(|d| d.to_string());
        let out = Command::new(dir.path().join("venv/bin/python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/onnx_check.py"))
            .args([&onnx, &inputs, &logits])
            .args(&dims)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        eprintln!("{name}: onnxruntime vs alexnet: {report}");
        assert!(out.status.success(), "{name}: {report} {}", String::from_utf8_lossy(&out.stderr));
    }
}
