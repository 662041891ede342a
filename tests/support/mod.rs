//! Helpers shared by the integration tests.
// Each test crate uses its own subset of these.
#![allow(dead_code)]

use alexnet::data::mnist::{self, Split};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The first `n` images of a real MNIST split, as gzipped IDX files in `dir`.
fn write_subset(dir: &Path, split: Split, prefix: &str, n: usize) {
    write_mnist(dir, split, prefix, 0..n, |l| l);
}

/// Images `range` of a real MNIST split with their labels mapped by `relabel`, as gzipped IDX
/// files `PREFIX-images-idx3-ubyte.gz` and `PREFIX-labels-idx1-ubyte.gz` in `dir`.
pub fn write_mnist(dir: &Path, split: Split, prefix: &str, range: std::ops::Range<usize>, relabel: impl Fn(u32) -> u32) {
    let ds = mnist::load(&mnist::default_dir(), split, true).unwrap();
    let gz = |name: String, header: Vec<u32>, body: Vec<u8>| {
        let mut e = GzEncoder::new(std::fs::File::create(dir.join(name)).unwrap(), Compression::fast());
        header.iter().for_each(|v| e.write_all(&v.to_be_bytes()).unwrap());
        e.write_all(&body).unwrap();
        e.finish().unwrap();
    };
    let n = range.len();
    let pixels = ds.images[range.start * 784..range.end * 784].iter().map(|v| (v * 255.0).round() as u8).collect();
    gz(format!("{prefix}-images-idx3-ubyte.gz"), vec![2051, n as u32, 28, 28], pixels);
    gz(format!("{prefix}-labels-idx1-ubyte.gz"), vec![2049, n as u32], ds.labels[range].iter().map(|&l| relabel(l) as u8).collect());
}

/// A temporary directory with an MNIST subset in `data/` (`train` training and `test` test
/// images) and room for run directories.
pub struct Setup {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub data: PathBuf,
}

pub fn setup(train: usize, test: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    std::fs::create_dir(&data).unwrap();
    write_subset(&data, Split::Train, "train", train);
    write_subset(&data, Split::Test, "t10k", test);
    Setup { _dir: dir, root, data }
}

/// Run the binary with `args` (in `cwd` if given).
pub fn alexnet_in(cwd: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_alexnet"));
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.args(args).output().expect("runs the binary")
}

pub fn alexnet(args: &[&str]) -> std::process::Output {
    alexnet_in(None, args)
}

/// `args` must fail with every one of `needles` in stderr, and without a panic; returns stderr.
pub fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let out = alexnet(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr {err:?} lacks {n:?}");
    }
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

/// A throwaway virtualenv in `dir` with `packages` from PyPI, for checks against other
/// software (onnxruntime, TensorBoard): its python, or `None` after saying why the check is
/// skipped. Under CI (`CI=true`) the check must run: a missing package fails the test instead.
pub fn python_with(dir: &Path, packages: &[&str]) -> Option<PathBuf> {
    let why = match venv_with(dir, packages) {
        Ok(python) => return Some(python),
        Err(why) => why,
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {packages:?} cannot be installed: {why}");
    }
    eprintln!("SKIPPED the {packages:?} check (it fails under CI=true): {why}");
    None
}

fn venv_with(dir: &Path, packages: &[&str]) -> Result<PathBuf, String> {
    use std::process::Command;
    let venv = dir.join("venv");
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().map_err(|e| format!("no python3 ({e})"))?;
    if !made.status.success() {
        return Err(format!("python3 -m venv failed: {}", String::from_utf8_lossy(&made.stderr)));
    }
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "30"])
        .args(packages)
        .output()
        .map_err(|e| format!("cannot run pip ({e})"))?;
    if !pip.status.success() {
        return Err(format!("pip cannot install them (no registry?): {}", String::from_utf8_lossy(&pip.stderr).trim()));
    }
    Ok(venv.join("bin/python"))
}
