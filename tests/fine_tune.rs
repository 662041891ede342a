//! Fine-tuning as people do it with torchvision: start from a trained model, freeze its
//! features, train the rest on a new task. Here the new task is other MNIST digits with their
//! labels permuted, so the old classifier is wrong for it and only the features carry over.

mod support;

use alexnet::data::mnist::Split;
use std::path::Path;

fn train(args: &[&str]) -> f32 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_alexnet")).arg("train").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().find_map(|l| l.strip_prefix("Testing Accuracy: ")).expect("a Testing Accuracy line").trim().parse().unwrap()
}

/// A dataset directory of MNIST training images `train` and test images `test`, labels mapped.
fn dataset(dir: &Path, train: std::ops::Range<usize>, test: std::ops::Range<usize>, relabel: fn(u32) -> u32) -> String {
    std::fs::create_dir_all(dir).unwrap();
    support::write_mnist(dir, Split::Train, "train", train, relabel);
    support::write_mnist(dir, Split::Test, "t10k", test, relabel);
    dir.display().to_string()
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: run `cargo test --release` (trains real models)")]
fn a_fine_tuned_model_learns_a_new_task_in_fewer_steps_than_one_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let first = dataset(&root.join("first"), 0..3200, 0..500, |l| l);
    let second = dataset(&root.join("second"), 3200..6400, 500..1000, |l| (l + 3) % 10);
    let pre = root.join("pre");
    let quick = ["--conv-algo", "im2col", "--display-step", "10", "--eval-batch", "500"];
    train(&[&["--data", &first, "--samples", "3200", "--out", pre.to_str().unwrap()][..], &quick].concat());
    let model = pre.join("model.safetensors");
    // On the second task: 20 steps from the first model with its features frozen and the
    // classifier at 10x, against 40 from scratch.
    let steps = ["--data", &second, "--samples", "1280"];
    let tuned = root.join("tuned");
    let from_first = [
        &steps[..],
        &quick,
        &["--init-from", model.to_str().unwrap(), "--freeze-through", "fc1", "--lr-mult", "fc3=10", "--out", tuned.to_str().unwrap()],
    ]
    .concat();
    let tuned_acc = train(&from_first);
    let scratch_dir = root.join("scratch");
    let scratch = ["--data", &second, "--samples", "2560", "--out", scratch_dir.to_str().unwrap()];
    let scratch_acc = train(&[&scratch[..], &quick].concat());
    eprintln!("on the new task: fine-tuned for 20 steps {tuned_acc}, from scratch for 40 steps {scratch_acc}");
    assert!(tuned_acc > scratch_acc + 0.05, "fine-tuned {tuned_acc} (20 steps) vs from scratch {scratch_acc} (40 steps)");
}
