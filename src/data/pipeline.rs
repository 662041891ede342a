//! The paper's input pipeline for ImageFolder data (sections 2 and 4.1): every image is
//! rescaled so its shorter side is 256 and centre-cropped to 256x256 (for the paper's 227 and
//! torchvision's 224 inputs; other input sizes keep that ratio, `prepared_side`); the mean
//! image over the training set is subtracted; training takes random `crop`x`crop` patches and their
//! reflections and adds PCA colour noise; evaluation takes the centre crop or ten crops.
//! Images are decoded in parallel for each batch.

use super::augment::{ColourPca, RgbMoments, add_colour, crop, ten_crop_offsets};
use super::folder::{ImageFolder, Sample};
use crate::files::{f32_bytes, f32s_from_bytes, safetensors_bytes, write_atomic};
use crate::rng::{stream_id, substream};
use anyhow::{Context, Result, bail};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::rand_core::Rng as _;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Side of the prepared (rescaled, centre-cropped) images for a model input of `crop`: the
/// 256:224 of torchvision's recipe, rounded to a multiple of 16, so both the paper's 227 and
/// torchvision's 224 crop from 256x256; 63 (alexnet-owt's smallest) from 80x80.
pub fn prepared_side(crop: usize) -> usize {
    ((crop + 7) / 14 * 16).max(crop)
}
/// The statistics caches' folder in the cache directory; each file is named by its key.
pub const STATS_DIR: &str = "dataset-stats";

/// Decode `bytes` and prepare it: shorter side rescaled to `side` (aspect kept), centre crop
/// `side`x`side`, RGB as f32 in [0, 255] (HWC). Decoding is capped at 16384x16384 and 1 GiB. The
/// centre square is cut before resizing, so only the crop is ever resized: resizing first let a
/// 129-byte 16384x1 PNG ask for a 4194304x256 image (35 s, 3.4 GB).
pub fn prepare(bytes: &[u8], side: usize) -> Result<Vec<f32>> {
    let img = super::decode_image(bytes, 1 << 14, 1 << 30)?.to_rgb8();
    let (w, h) = img.dimensions();
    let square_side = w.min(h);
    let square = image::imageops::crop_imm(&img, (w - square_side) / 2, (h - square_side) / 2, square_side, square_side).to_image();
    let resized = image::imageops::resize(&square, side as u32, side as u32, image::imageops::FilterType::Triangle);
    Ok(resized.pixels().flat_map(|p| p.0.map(f32::from)).collect())
}

fn prepare_file(path: &Path, side: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    prepare(&bytes, side).with_context(|| format!("cannot decode image {}", path.display()))
}

/// The training set's mean image and colour PCA, and the images that could not be read.
#[derive(Clone, Debug)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub pca: ColourPca,
    pub unreadable: Vec<PathBuf>,
}

/// What the statistics depend on: every image's path within the dataset, size and modification
/// time: the dataset's content, not how its root is spelled (relative, absolute, a mount point).
fn stats_key(root: &Path, samples: &[&Sample], side: usize) -> String {
    let mut h = Sha256::new();
    // Bump when the statistics' definition changes, so old caches are recomputed.
    h.update(format!("alexnet-stats v4: centre square resized to {side}, mean 0-255, colour PCA of [0, 1] pixels\n"));
    for s in samples {
        let meta = std::fs::metadata(&s.path).ok();
        let mtime = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let within = s.path.strip_prefix(root).unwrap_or(&s.path);
        h.update(format!("{}\t{:?}\t{:?}\n", within.display(), meta.map(|m| m.len()), mtime));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn read_cache(path: &Path, key: &str, side: usize) -> Option<Stats> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let meta = crate::files::metadata(path, &bytes).ok()?;
    if meta.get("key")? != key {
        return None;
    }
    let floats = |name: &str| -> Option<Vec<f32>> { Some(f32s_from_bytes(st.tensor(name).ok()?.data())) };
    let (mean, values, vectors) = (floats("mean")?, floats("pca_eigenvalues")?, floats("pca_eigenvectors")?);
    if mean.len() != side * side * 3 || values.len() != 3 || vectors.len() != 9 {
        return None;
    }
    let pca = ColourPca {
        eigenvalues: [values[0], values[1], values[2]],
        eigenvectors: std::array::from_fn(|i| std::array::from_fn(|j| vectors[3 * i + j])),
    };
    Some(Stats { mean, pca, unreadable: serde_json::from_str(meta.get("unreadable")?).ok()? })
}

/// The statistics of `folder`'s training images, computed once (one decoding pass with a
/// progress bar) and cached in `cache_dir` under the dataset's content key (never in the
/// dataset, which may be read-only); recomputed when any image changes. Unreadable images are
/// cached by their path within the dataset. The validation images are decoded in the same
/// pass, so unreadable files on either side are known before training starts.
pub fn stats(folder: &ImageFolder, side: usize, cache_dir: Option<&Path>) -> Result<Stats> {
    let all: Vec<&Sample> = folder.train.iter().chain(&folder.val).collect();
    let key = stats_key(&folder.root, &all, side);
    let cache = cache_dir.map(|d| d.join(STATS_DIR).join(format!("{key}.safetensors")));
    if let Some(mut s) = cache.as_deref().and_then(|c| read_cache(c, &key, side)) {
        s.unreadable = s.unreadable.iter().map(|p| folder.root.join(p)).collect();
        return Ok(s);
    }
    let bar = indicatif::ProgressBar::new(all.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("mean image and colour PCA {bar:30} {pos}/{len} images  ETA {eta}")
            .expect("valid template"),
    );
    let train_len = folder.train.len();
    // Per-thread partial sums (pixel sums in f64 and RGB moments), merged at the end.
    let partial = || (vec![0.0f64; side * side * 3], RgbMoments::default(), 0usize, Vec::new());
    let (sum, moments, count, unreadable) = all
        .par_iter()
        .enumerate()
        .fold(partial, |(mut sum, mut moments, mut count, mut bad), (i, s)| {
            match prepare_file(&s.path, side) {
                Ok(px) if i < train_len => {
                    sum.iter_mut().zip(&px).for_each(|(a, &p)| *a += p as f64);
                    // Colour statistics of pixels in [0, 1] (see `FolderData::fill_train`).
                    moments.add(&px.iter().map(|v| v / 255.0).collect::<Vec<_>>());
                    count += 1;
                }
                Ok(_) => {}
                Err(e) => bad.push((s.path.clone(), format!("{e:#}"))),
            }
            bar.inc(1);
            (sum, moments, count, bad)
        })
        .reduce(partial, |(mut s1, mut m1, c1, mut b1), (s2, m2, c2, b2)| {
            s1.iter_mut().zip(&s2).for_each(|(a, b)| *a += b);
            m1.merge(&m2);
            b1.extend(b2);
            (s1, m1, c1 + c2, b1)
        });
    bar.finish_and_clear();
    if count == 0 {
        bail!("none of the {train_len} training images in {} could be read", folder.root.display());
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / count as f64) as f32).collect();
    let pca = moments.pca();
    let mut unreadable = unreadable;
    unreadable.sort();
    for (path, why) in &unreadable {
        eprintln!("warning: unreadable image {}: {why}", path.display());
    }
    let unreadable: Vec<PathBuf> = unreadable.into_iter().map(|(p, _)| p).collect();
    let (mean_b, values_b, vectors_b) = (f32_bytes(&mean), f32_bytes(&pca.eigenvalues), f32_bytes(pca.eigenvectors.as_flattened()));
    let views = vec![
        ("mean", TensorView::new(Dtype::F32, vec![side, side, 3], &mean_b)?),
        ("pca_eigenvalues", TensorView::new(Dtype::F32, vec![3], &values_b)?),
        ("pca_eigenvectors", TensorView::new(Dtype::F32, vec![3, 3], &vectors_b)?),
    ];
    if let Some(cache) = cache {
        let within: Vec<&Path> = unreadable.iter().map(|p| p.strip_prefix(&folder.root).unwrap_or(p)).collect();
        let meta = [("key".to_string(), key), ("unreadable".to_string(), serde_json::to_string(&within)?)].into_iter().collect();
        // A cache that cannot be written (read-only home, full disk) costs only the next run's time.
        let written = cache
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(anyhow::Error::from)
            .and_then(|_| write_atomic(&cache, &safetensors_bytes(views, meta)?));
        if let Err(e) = written {
            eprintln!("warning: cannot cache the dataset statistics in {}: {e:#}", cache.display());
        }
    }
    Ok(Stats { mean, pca, unreadable })
}

/// An ImageFolder dataset prepared for one model input size.
pub struct FolderData {
    pub classes: Vec<String>,
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub stats: Stats,
    /// Side of the model's input (227 for the paper's model, 224 for torchvision's).
    pub crop: usize,
    /// Side of the prepared images the crops are taken from (`prepared_side`).
    pub side: usize,
    /// Multiplier of the mean-subtracted 0-255 pixels (`Architecture::input_scale`).
    pub scale: f32,
}

impl FolderData {
    /// Scan, compute (or load) the statistics, and drop unreadable images with a warning, or
    /// fail naming them if `strict`.
    pub fn open(root: &Path, crop: usize, scale: f32, strict: bool, cache_dir: Option<&Path>) -> Result<FolderData> {
        let side = prepared_side(crop);
        let folder = super::folder::scan(root)?;
        let stats = stats(&folder, side, cache_dir)?;
        if strict && !stats.unreadable.is_empty() {
            let list: Vec<String> = stats.unreadable.iter().map(|p| p.display().to_string()).collect();
            bail!("{} unreadable images (drop --strict-images to skip them):\n  {}", list.len(), list.join("\n  "));
        }
        let readable = |s: &Sample| !stats.unreadable.contains(&s.path);
        let (train, val): (Vec<Sample>, Vec<Sample>) =
            (folder.train.into_iter().filter(readable).collect(), folder.val.into_iter().filter(readable).collect());
        if train.is_empty() || val.is_empty() {
            bail!("{}: no readable training or validation images", root.display());
        }
        Ok(FolderData { classes: folder.classes, train, val, stats, crop, side, scale })
    }

    pub fn input_len(&self) -> usize {
        self.crop * self.crop * 3
    }

    /// A prepared image minus the mean image, scaled.
    fn centred(&self, s: &Sample) -> Result<Vec<f32>> {
        let mut px = prepare_file(&s.path, self.side)?;
        px.iter_mut().zip(&self.stats.mean).for_each(|(p, m)| *p = (*p - m) * self.scale);
        Ok(px)
    }

    /// A training batch of the samples `indices`: each image gets a random crop position,
    /// reflection and PCA colour shift (alphas ~ N(0, 0.1)), drawn from `stream` by sample, so
    /// they change every epoch (the caller folds the epoch into `stream`) and do not depend on
    /// thread scheduling.
    pub fn fill_train(&self, indices: &[u32], stream: u64, input: &mut [f32], labels: &mut Vec<u32>) -> Result<()> {
        let len = self.input_len();
        let span = self.side - self.crop + 1;
        input[..indices.len() * len].par_chunks_mut(len).zip(indices).try_for_each(|(dst, &i)| -> Result<()> {
            let s = &self.train[i as usize];
            let mut px = self.centred(s)?;
            let mut rng = substream(stream, i as u64);
            let normal = Normal::new(0.0f32, 0.1).expect("valid");
            let (top, left, flip) =
                ((rng.next_u64() % span as u64) as usize, (rng.next_u64() % span as u64) as usize, rng.next_u64() & 1 == 1);
            // The PCA is of pixels in [0, 1]: the paper's shift uses the eigenvalues (variances)
            // themselves, which in 0-255 units would make it 255 times too strong. This is how
            // the common implementations read it (fb.resnet.torch's `Lighting`, eigenvalues
            // ~0.2, 0.02, 0.005 on ImageNet): shifts of a few 0-255 levels.
            let shift = self.stats.pca.shift(std::array::from_fn(|_| normal.sample(&mut rng)));
            add_colour(&mut px, shift.map(|v| v * 255.0 * self.scale));
            crop(&px, self.side, self.side, 3, top, left, self.crop, flip, dst);
            Ok(())
        })?;
        labels.clear();
        labels.extend(indices.iter().map(|&i| self.train[i as usize].label));
        Ok(())
    }

    /// Evaluation views of validation images `range`: the centre crop, or with `ten_crop` the
    /// four corners, the centre and their reflections; `view` picks one.
    pub fn fill_val(&self, range: std::ops::Range<usize>, view: usize, ten_crop: bool, input: &mut [f32]) -> Result<()> {
        self.fill_views(&self.val[range], view, ten_crop, input)
    }

    /// Training images `range` as evaluation sees images: the centre crop, no augmentation.
    pub fn fill_train_centre(&self, range: std::ops::Range<usize>, input: &mut [f32]) -> Result<()> {
        self.fill_views(&self.train[range], 0, false, input)
    }

    /// Image files, prepared as the validation images are (centre crop).
    pub fn fill_files(&self, paths: &[PathBuf], input: &mut [f32]) -> Result<()> {
        let samples: Vec<Sample> = paths.iter().map(|p| Sample { path: p.clone(), label: 0 }).collect();
        self.fill_views(&samples, 0, false, input)
    }

    fn fill_views(&self, samples: &[Sample], view: usize, ten_crop: bool, input: &mut [f32]) -> Result<()> {
        let len = self.input_len();
        let (top, left, flip) = if ten_crop {
            ten_crop_offsets(self.side, self.side, self.crop)[view]
        } else {
            ((self.side - self.crop) / 2, (self.side - self.crop) / 2, false)
        };
        input[..samples.len() * len].par_chunks_mut(len).zip(samples).try_for_each(|(dst, s)| -> Result<()> {
            crop(&self.centred(s)?, self.side, self.side, 3, top, left, self.crop, flip, dst);
            Ok(())
        })
    }

    /// The random stream of training epoch `epoch`.
    pub fn epoch_stream(seed: u64, epoch: u64) -> u64 {
        stream_id(&[seed, epoch, 0x0050_4341])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::tests::write_colour_folder;

    #[test]
    fn prepares_to_256_and_caches_statistics_and_skips_unreadable_images() {
        // A 512x300 image: shorter side to 256 (437x256), centre crop 256x256.
        let img = image::RgbImage::from_fn(512, 300, |x, _| image::Rgb([if x < 256 { 0 } else { 255 }, 10, 20]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let px = prepare(&png, 256).unwrap();
        assert_eq!(px.len(), 256 * 256 * 3);
        assert_eq!((px[0], px[1], px[2]), (0.0, 10.0, 20.0));
        assert_eq!(px[(255 * 256 + 255) * 3], 255.0);

        let dir = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Some(cache_dir.path());
        write_colour_folder(dir.path(), 2, 3, 1);
        std::fs::write(dir.path().join("train/class1/broken.jpg"), b"\xff\xd8\xffnot a jpeg").unwrap();
        let listing = |d: &Path| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect::<std::collections::BTreeSet<_>>();
        let before = listing(dir.path());
        let err = format!("{:#}", FolderData::open(dir.path(), 227, 1.0, true, cache).err().unwrap());
        assert!(err.contains("broken.jpg") && err.contains("--strict-images"), "{err}");
        let data = FolderData::open(dir.path(), 227, 1.0, false, cache).unwrap();
        assert_eq!((data.train.len(), data.val.len()), (6, 2));
        // The statistics are cached in the cache directory, and nothing is written into the
        // dataset (which may be read-only).
        assert_eq!(listing(&cache_dir.path().join(STATS_DIR)).len(), 1);
        assert_eq!(listing(dir.path()), before);
        // Class 0 is red, class 1 green: the mean image is their average, the top principal
        // component the red-green axis.
        let mean_red = data.stats.mean.chunks(3).map(|p| p[0]).sum::<f32>() / (256.0 * 256.0);
        assert!((100.0..160.0).contains(&mean_red), "{mean_red}");
        let top = data.stats.pca.eigenvectors[0];
        assert!(top[0].abs() > 0.6 && top[1].abs() > 0.6 && top[0] * top[1] < 0.0, "{top:?}");
        // The cache is used while nothing changes: same statistics, the same unreadable file;
        // and it is keyed by content, so another spelling of the root finds it too.
        let again = FolderData::open(dir.path(), 227, 1.0, false, cache).unwrap();
        assert_eq!(again.stats.mean, data.stats.mean);
        assert_eq!(again.stats.unreadable, data.stats.unreadable);
        let other_spelling = dir.path().join("train").join("..");
        let spelled = FolderData::open(&other_spelling, 227, 1.0, false, cache).unwrap();
        assert_eq!(spelled.stats.mean, data.stats.mean);
        assert_eq!(listing(&cache_dir.path().join(STATS_DIR)).len(), 1, "no second cache entry");
        // A very long, thin image is only resized as far as the crop needs (once 35 s, 3.4 GB).
        let thin = image::RgbImage::from_pixel(16384, 1, image::Rgb([9, 9, 9]));
        let mut png = Vec::new();
        thin.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(prepare(&png, 256).unwrap().len(), 256 * 256 * 3);
        assert!(started.elapsed().as_secs_f64() < 5.0, "{:?}", started.elapsed());

        let (mut input, mut labels) = (vec![0.0; 2 * 227 * 227 * 3], Vec::new());
        data.fill_train(&[0, 5], 7, &mut input, &mut labels).unwrap();
        assert_eq!(labels, [0, 1]);
        let first = input.clone();
        data.fill_train(&[0, 5], 7, &mut input, &mut labels).unwrap();
        assert_eq!(input, first, "same stream, same augmentation");
        data.fill_train(&[0, 5], 8, &mut input, &mut labels).unwrap();
        assert_ne!(input, first, "another epoch, other crops and colours");
        for view in 0..10 {
            data.fill_val(0..2, view, true, &mut input).unwrap();
        }
        // Another input size prepares images at its own side, with statistics of their own.
        let small = FolderData::open(dir.path(), 63, 1.0, false, cache).unwrap();
        assert_eq!((small.side, small.stats.mean.len()), (80, 80 * 80 * 3));
        assert_eq!(listing(&cache_dir.path().join(STATS_DIR)).len(), 2);
        small.fill_train(&[0, 5], 7, &mut input[..2 * 63 * 63 * 3], &mut labels).unwrap();
    }

    #[test]
    fn prepared_sides_keep_the_paper_and_torchvision_at_256() {
        let sides: Vec<usize> = [63, 64, 100, 128, 224, 227, 256, 320].map(prepared_side).to_vec();
        assert_eq!(sides, [80, 80, 112, 144, 256, 256, 288, 368]);
        assert!((1..2000).all(|crop| prepared_side(crop) >= crop));
    }
}
