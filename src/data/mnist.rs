//! MNIST from its four IDX files, validated and scaled to [0, 1].

use super::idx::{self, IdxError};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// SHA-256 of the standard gzipped files, as vendored in `data/mnist/`.
const KNOWN_SHA256: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte.gz", "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"),
    ("train-labels-idx1-ubyte.gz", "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203"),
    ("t10k-images-idx3-ubyte.gz", "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be"),
    ("t10k-labels-idx1-ubyte.gz", "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b"),
];

/// Environment variable naming the data directory when `--data` is not given.
pub const DATA_ENV: &str = "ALEXNET_DATA";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Images as `n x rows x cols x channels` f32 (NHWC; MNIST's in [0, 1], one channel) and their
/// class labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub rows: usize,
    pub cols: usize,
    pub channels: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_len(&self) -> usize {
        self.rows * self.cols * self.channels
    }
    /// `n` random images of `shape` (H, W, C; values N(0, 1), like mean-subtracted pixels)
    /// with labels cycling through `classes`: for throughput measurement (`bench --dummy`).
    pub fn dummy(n: usize, shape: [usize; 3], classes: usize) -> Dataset {
        let [rows, cols, channels] = shape;
        let mut images = vec![0.0; n * rows * cols * channels];
        let labels = images.chunks_exact_mut(rows * cols * channels).enumerate().map(|(i, dst)| dummy_sample(i, classes, dst)).collect();
        Dataset { images, labels, rows, cols, channels }
    }

    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * self.image_len()..(i + 1) * self.image_len()]
    }
}

/// Dummy sample `index`: N(0, 1) pixels drawn from a generator keyed by the index, so any
/// sample can be made on its own (`train --dummy` makes them batch by batch); label
/// `index % classes`.
pub fn dummy_sample(index: usize, classes: usize, dst: &mut [f32]) -> u32 {
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = crate::rng::substream(crate::rng::stream_id(&[0x4455_4d4d]), index as u64);
    dst.iter_mut().for_each(|v| *v = StandardNormal.sample(&mut rng));
    (index % classes) as u32
}

/// The vendored copy: `./data/mnist` if run from the repository, else the crate's own.
pub fn default_dir() -> PathBuf {
    let local = PathBuf::from("data/mnist");
    if local.is_dir() { local } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist") }
}

/// `--data`, else `$ALEXNET_DATA`, else the vendored copy. The bool says whether the directory
/// is the vendored one, whose checksums must match.
pub fn resolve_dir(flag: Option<&Path>) -> (PathBuf, bool) {
    match (flag, std::env::var_os(DATA_ENV)) {
        (Some(p), _) => (p.to_path_buf(), false),
        (None, Some(p)) => (PathBuf::from(p), false),
        (None, None) => (default_dir(), true),
    }
}

/// Find `stem` (e.g. `train-images-idx3-ubyte`) in `dir`, gzipped or raw.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("data directory {} is not a directory (set --data DIR or ${DATA_ENV})", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("data directory {} does not exist (set --data DIR or ${DATA_ENV})", dir.display())
        }
        Err(e) => bail!("data directory {} cannot be read: {e} (set --data DIR or ${DATA_ENV})", dir.display()),
    }
    bail!("{}: missing {stem}.gz (or {stem}): expected the four MNIST IDX files", dir.display())
}

/// Compare a standard file's SHA-256 with the published one. `strict` makes a mismatch an
/// error (the vendored copy must be intact); otherwise it is reported and the file is used,
/// so IDX files of other datasets under the standard names still load.
fn verify_checksum(path: &Path, strict: bool) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let Some((_, want)) = KNOWN_SHA256.iter().find(|(n, _)| *n == name) else {
        return Ok(());
    };
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    if got != *want {
        let msg = format!("{}: SHA-256 {got} is not the standard MNIST file's {want}", path.display());
        if strict {
            bail!("{msg}: the vendored copy is corrupt (restore it with git checkout)");
        }
        eprintln!("warning: {msg}");
    }
    Ok(())
}

/// Load one split from `dir`, validating everything a corrupt or mismatched file could break.
pub fn load(dir: &Path, split: Split, strict: bool) -> Result<Dataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let img_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lbl_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    verify_checksum(&img_path, strict)?;
    verify_checksum(&lbl_path, strict)?;
    let images = idx::read(&img_path, 3)?;
    let labels = idx::read(&lbl_path, 1)?;
    let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    if n != labels.dims[0] {
        return Err(IdxError::Format {
            path: lbl_path,
            what: format!("{} labels but {} has {n} images", labels.dims[0], img_path.display()),
        }
        .into());
    }
    if n == 0 || rows == 0 || cols == 0 {
        bail!("{}: no images ({n} x {rows} x {cols})", img_path.display());
    }
    if let Some(i) = labels.data.iter().position(|&l| l > 9) {
        return Err(IdxError::Format { path: lbl_path, what: format!("label {} at index {i} is outside 0..=9", labels.data[i]) }.into());
    }
    Ok(Dataset {
        images: images.data.iter().map(|&p| p as f32 / 255.0).collect(),
        labels: labels.data.iter().map(|&l| l as u32).collect(),
        rows,
        cols,
        channels: 1,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::io::Write;

    /// Write a small synthetic MNIST-layout dataset (raw, not gzipped) into `dir`.
    pub fn write_idx(dir: &Path, prefix: &str, n_images: u32, labels: &[u8]) {
        let mut img = vec![0, 0, 8, 3];
        for d in [n_images, 28, 28] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        img.extend((0..n_images as usize * 784).map(|i| (i % 251) as u8));
        std::fs::File::create(dir.join(format!("{prefix}-images-idx3-ubyte"))).unwrap().write_all(&img).unwrap();
        let mut lbl = vec![0, 0, 8, 1];
        lbl.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        lbl.extend_from_slice(labels);
        std::fs::File::create(dir.join(format!("{prefix}-labels-idx1-ubyte"))).unwrap().write_all(&lbl).unwrap();
    }

    #[test]
    fn loads_raw_files_and_reports_count_mismatch_and_bad_labels() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(dir.path(), "t10k", 3, &[1, 2, 3]);
        let ds = load(dir.path(), Split::Test, false).unwrap();
        assert_eq!((ds.len(), ds.rows, ds.cols), (3, 28, 28));
        assert!((ds.images[250] - 250.0 / 255.0).abs() < 1e-6);
        write_idx(dir.path(), "t10k", 3, &[1, 2]);
        let err = format!("{:#}", load(dir.path(), Split::Test, false).unwrap_err());
        assert!(err.contains("2 labels but") && err.contains("t10k-labels"), "{err}");
        write_idx(dir.path(), "t10k", 3, &[1, 12, 3]);
        let err = format!("{:#}", load(dir.path(), Split::Test, false).unwrap_err());
        assert!(err.contains("label 12 at index 1"), "{err}");
        let err = format!("{:#}", load(dir.path(), Split::Train, false).unwrap_err());
        assert!(err.contains("missing train-images-idx3-ubyte"), "{err}");
        let err = format!("{:#}", load(&dir.path().join("nope"), Split::Train, false).unwrap_err());
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn vendored_mnist_matches_published_checksums_and_counts() {
        let test = load(&default_dir(), Split::Test, true).unwrap();
        assert_eq!(test.len(), 10_000);
        let mut counts = [0; 10];
        test.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert_eq!(counts, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
        let corrupt = tempfile::tempdir().unwrap();
        for (name, _) in KNOWN_SHA256 {
            std::fs::copy(default_dir().join(name), corrupt.path().join(name)).unwrap();
        }
        let p = corrupt.path().join("t10k-labels-idx1-ubyte.gz");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
        let err = format!("{:#}", load(corrupt.path(), Split::Test, true).unwrap_err());
        assert!(err.contains("t10k-labels-idx1-ubyte.gz") && err.contains("SHA-256"), "{err}");
    }
}
