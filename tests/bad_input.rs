//! Inputs a user can get wrong, through the real binary: each gets a one-line error before any
//! work is done (or the right answer), never a panic, and nothing already written is lost.

mod support;

use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Setup, alexnet, alexnet_in, fails_with};

/// Training flags that keep a test run short: a forced algorithm (no timing), a small
/// evaluation batch.
const QUICK: [&str; 4] = ["--conv-algo", "im2col", "--eval-batch", "16"];

/// Lines of stderr that are not warnings (a data subset draws checksum warnings).
fn error_lines(stderr: &str) -> usize {
    stderr.lines().filter(|l| !l.starts_with("warning:")).count()
}

fn text(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A one-step run of the seed model on a 64-image subset; returns the run directory.
fn trained(s: &Setup, name: &str) -> PathBuf {
    let out = s.root.join(name);
    let args = [&["train", "--samples", "64", "--data", text(&s.data), "--out", text(&out)][..], &QUICK].concat();
    let done = alexnet(&args);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    out
}

fn write_gz(path: &Path, header: &[u32], body: &[u8]) {
    let mut e = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
    header.iter().for_each(|v| e.write_all(&v.to_be_bytes()).unwrap());
    e.write_all(body).unwrap();
    e.finish().unwrap();
}

/// Test images of another size than the training images: refused when the data is opened,
/// not after training (it used to panic in the first evaluation and lose the model).
#[test]
fn test_images_of_another_size_are_refused_before_training() {
    let s = support::setup(64, 16);
    write_gz(&s.data.join("t10k-images-idx3-ubyte.gz"), &[2051, 16, 32, 32], &[0u8; 16 * 32 * 32]);
    let out = s.root.join("run");
    let args = [&["train", "--samples", "64", "--data", text(&s.data), "--out", text(&out)][..], &QUICK].concat();
    fails_with(&args, &["t10k-images", "32x32x1", "28x28x1"]);
    assert!(!out.join("checkpoint.safetensors").exists());
}

#[test]
fn export_refuses_to_overwrite_its_input_or_an_existing_file_unless_forced() {
    let s = support::setup(64, 16);
    let run = trained(&s, "run");
    let model = run.join("model.safetensors");
    let before = std::fs::read(&model).unwrap();
    fails_with(&["export", "--checkpoint", text(&model), "--onnx", text(&model)], &["model.safetensors", "model being exported"]);
    // Even with --force, and under another spelling of the same path.
    let spelled = run.join(".").join("model.safetensors");
    fails_with(&["export", "--checkpoint", text(&model), "--onnx", text(&spelled), "--force"], &["model being exported"]);
    assert_eq!(std::fs::read(&model).unwrap(), before, "the model is untouched");
    let onnx = s.root.join("out.onnx");
    std::fs::write(&onnx, b"someone's file").unwrap();
    fails_with(&["export", "--checkpoint", text(&model), "--onnx", text(&onnx)], &["out.onnx", "already exists", "--force"]);
    assert_eq!(std::fs::read(&onnx).unwrap(), b"someone's file");
    let forced = alexnet(&["export", "--checkpoint", text(&model), "--onnx", text(&onnx), "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    assert_ne!(std::fs::read(&onnx).unwrap(), b"someone's file");
}

/// A second run on a directory in use fails at once, naming the first one's pid. (A lock left
/// by a killed run is taken over: tests/resume.rs resumes runs killed with SIGKILL.)
#[test]
fn a_run_directory_is_locked_while_a_run_uses_it() {
    let s = support::setup(64, 16);
    let out = s.root.join("run");
    let args = [&["train", "--samples", "1000000", "--data", text(&s.data), "--out", text(&out)][..], &QUICK].concat();
    let first = Command::new(env!("CARGO_BIN_EXE_alexnet")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Killed however the test ends, so a failed assertion leaves no run behind.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
    let first = KillOnDrop(first);
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "the first run did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let resume = ["train", "--resume", text(&out)];
    for second in [&args[..], &resume[..]] {
        let err = fails_with(second, &["in use by another training run", &format!("pid {}", first.0.id())]);
        assert_eq!(error_lines(&err), 1, "{err}");
    }
}

#[test]
fn absurd_thread_counts_are_refused_by_name() {
    fails_with(&["--threads", "100000", "summary"], &["--threads 100000", "at most"]);
    fails_with(&["--threads", "100000", "predict", "--checkpoint", "m.safetensors", "x.png"], &["--threads 100000"]);
    fails_with(&["--threads", "100000", "train"], &["--threads 100000"]);
}

/// config.json holds absolute paths: a run started with relative ones resumes from anywhere.
#[test]
fn a_run_resumes_from_another_working_directory() {
    let s = support::setup(64, 16);
    let started = alexnet_in(Some(&s.root), &[&["train", "--samples", "64", "--data", "data", "--out", "run"][..], &QUICK].concat());
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(s.root.join("run/config.json")).unwrap()).unwrap();
    assert!(Path::new(config["data"].as_str().unwrap()).is_absolute() && Path::new(config["out"].as_str().unwrap()).is_absolute());
    let elsewhere = tempfile::tempdir().unwrap();
    let resumed = alexnet_in(Some(elsewhere.path()), &["train", "--resume", text(&s.root.join("run"))]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
}

#[test]
fn odd_flags_get_messages_about_themselves() {
    fails_with(&["train", "--epochs", "0"], &["--epochs must be at least 1"]);
    fails_with(&["train", "--epochs", "1", "--samples", "640"], &["--epochs", "--samples", "cannot be used with"]);
    fails_with(&["predict", "--top", "0", "--checkpoint", "m.safetensors", "x.png"], &["--top must be at least 1"]);
}

#[test]
fn predict_refuses_blank_and_unreadable_images_with_one_clear_message_each() {
    let s = support::setup(64, 16);
    let model = trained(&s, "run").join("model.safetensors");
    let (white, black, empty) = (s.root.join("white.png"), s.root.join("black.png"), s.root.join("empty.png"));
    image::GrayImage::from_pixel(28, 28, image::Luma([255])).save(&white).unwrap();
    image::GrayImage::from_pixel(28, 28, image::Luma([0])).save(&black).unwrap();
    std::fs::write(&empty, b"").unwrap();
    let err = fails_with(&["predict", "--checkpoint", text(&model), text(&white), text(&black)], &["2 of 2 images"]);
    assert_eq!(err.matches("blank").count(), 2, "{err}");
    let err = fails_with(&["predict", "--checkpoint", text(&model), text(&empty)], &["empty.png"]);
    assert!(!err.contains("larger than"), "a zero-byte file is not too large: {err}");
    // An OS error is reported once, not once per layer of context.
    let err = fails_with(&["predict", "--checkpoint", text(&model), text(&s.root)], &["1 of 1 images"]);
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
}

#[test]
fn data_paths_that_are_not_directories_say_what_they_are() {
    let s = support::setup(64, 16);
    let file = s.data.join("train-images-idx3-ubyte.gz");
    let err = fails_with(&["train", "--data", text(&file), "--out", text(&s.root.join("a"))], &["is not a directory"]);
    assert!(!err.contains("does not exist"), "{err}");
    let looped = s.root.join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let err = fails_with(&["train", "--data", text(&looped), "--out", text(&s.root.join("b"))], &["loop", "cannot be read"]);
    assert!(!err.contains("does not exist"), "{err}");
}

#[test]
fn eval_needs_only_the_test_files_and_names_a_models_architecture() {
    let s = support::setup(64, 16);
    let model = trained(&s, "run").join("model.safetensors");
    let only_test = s.root.join("only-test");
    std::fs::create_dir(&only_test).unwrap();
    for f in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::fs::copy(s.data.join(f), only_test.join(f)).unwrap();
    }
    let out = alexnet(&["eval", "--checkpoint", text(&model), "--data", text(&only_test)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("16 test images"));
    let err = fails_with(&["eval", "--checkpoint", text(&model), "--model", "alexnet"], &["holds model alexnet-mnist", "not alexnet"]);
    assert_eq!(error_lines(&err), 1, "{err}");
}

/// A run whose config names another architecture than its checkpoint holds: one line naming
/// both, not a line per tensor.
#[test]
fn resuming_as_another_model_names_both_architectures() {
    let s = support::setup(64, 16);
    let run = trained(&s, "run");
    let path = run.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["model"] = "alexnet".into();
    config["dummy"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let err = fails_with(&["train", "--resume", text(&run)], &["holds model alexnet-mnist", "not alexnet"]);
    assert_eq!(error_lines(&err), 1, "{err}");
}

/// An ImageFolder dataset that may be read-only: its statistics go to the cache directory,
/// keyed by content (another spelling of its path finds them), nothing is written into it, and
/// a 16384x1 image among its files costs no more than any other (it once took 35 s and 3.4 GB).
#[test]
#[cfg_attr(debug_assertions, ignore = "release only: trains an ImageNet-sized model")]
fn an_image_folder_is_only_read_and_its_statistics_are_cached_by_content() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("folder");
    for (split, n) in [("train", 2), ("val", 1)] {
        for (c, colour) in [[200u8, 30, 30], [30, 200, 30]].iter().enumerate() {
            let dir = data.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                image::RgbImage::from_pixel(40 + 9 * i, 30, image::Rgb(*colour)).save(dir.join(format!("img{i}.png"))).unwrap();
            }
        }
    }
    image::RgbImage::from_pixel(16384, 1, image::Rgb([9, 9, 9])).save(data.join("train/class0/thin.png")).unwrap();
    let listing = || {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut dirs = vec![data.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() { dirs.push(p) } else { files.push(p) }
            }
        }
        files.sort();
        files
    };
    let before = listing();
    let cache = root.path().join("cache");
    let train = |data_arg: &str, out: &str| {
        let args = ["train", "--model", "alexnet-owt", "--data", data_arg, "--samples", "2", "--batch-size", "2", "--eval-batch", "2"];
        let args = [&args[..], &["--conv-algo", "im2col", "--cache-dir", text(&cache), "--out", out]].concat();
        let started = Instant::now();
        let done = alexnet_in(Some(root.path()), &args);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        started.elapsed()
    };
    let took = train(text(&data), "run1");
    assert!(took < Duration::from_secs(120), "{took:?}");
    assert_eq!(listing(), before, "nothing written into the dataset");
    let cached = || std::fs::read_dir(cache.join("dataset-stats")).unwrap().count();
    assert_eq!(cached(), 1);
    train("./folder/train/..", "run2");
    assert_eq!(cached(), 1, "another spelling of the path reads the same cache entry");
}
