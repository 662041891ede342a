//! ImageFolder datasets: `ROOT/train/CLASS/*.{jpg,jpeg,png}` and `ROOT/val/CLASS/...`, class
//! indices in sorted order of the training class folders (as torchvision's ImageFolder).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: u32,
}

#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
}

/// Whether `root` looks like an ImageFolder dataset (has `train/` and `val/`).
pub fn is_image_folder(root: &Path) -> bool {
    root.join("train").is_dir() && root.join("val").is_dir()
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

/// The class folders of `split` and their images, by class name.
fn scan_split(root: &Path, split: &str) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let dir = root.join(split);
    let mut classes = Vec::new();
    for class_dir in sorted_entries(&dir)?.into_iter().filter(|p| p.is_dir()) {
        let name = class_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let images: Vec<PathBuf> = sorted_entries(&class_dir)?.into_iter().filter(|p| p.is_file() && is_image(p)).collect();
        if images.is_empty() {
            bail!("class folder {} has no .jpg, .jpeg or .png images", class_dir.display());
        }
        classes.push((name, images));
    }
    if classes.is_empty() {
        bail!("{} has no class folders (expected {}/CLASS/*.jpg)", dir.display(), dir.display());
    }
    Ok(classes)
}

/// Scan `root`: every class folder must hold images, and every validation class must be a
/// training class.
pub fn scan(root: &Path) -> Result<ImageFolder> {
    if !is_image_folder(root) {
        bail!("{} is not an ImageFolder dataset: it needs train/ and val/ subfolders", root.display());
    }
    let train = scan_split(root, "train")?;
    let classes: Vec<String> = train.iter().map(|(c, _)| c.clone()).collect();
    let label = |c: &str| classes.iter().position(|k| k == c);
    let mut val_samples = Vec::new();
    for (class, images) in scan_split(root, "val")? {
        let Some(l) = label(&class) else {
            bail!(
                "validation class '{class}' ({}) has no training folder in {}",
                root.join("val").join(&class).display(),
                root.join("train").display()
            );
        };
        val_samples.extend(images.into_iter().map(|path| Sample { path, label: l as u32 }));
    }
    let train_samples = train
        .into_iter()
        .enumerate()
        .flat_map(|(l, (_, images))| images.into_iter().map(move |path| Sample { path, label: l as u32 }))
        .collect();
    Ok(ImageFolder { root: root.to_path_buf(), classes, train: train_samples, val: val_samples })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Write a small ImageFolder: `classes` colours, images of varied sizes, PNG and JPEG.
    pub fn write_colour_folder(root: &Path, classes: usize, train_per_class: usize, val_per_class: usize) {
        let colours = [[200u8, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]];
        for (split, n) in [("train", train_per_class), ("val", val_per_class)] {
            for (c, colour) in colours.iter().enumerate().take(classes) {
                let dir = root.join(split).join(format!("class{c}"));
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..n {
                    let (w, h) = (40 + 13 * (i as u32 % 5), 30 + 17 * (i as u32 % 3));
                    let img = image::RgbImage::from_fn(w, h, |x, y| {
                        let noise = ((x * 31 + y * 17 + i as u32 * 7) % 40) as u8;
                        image::Rgb(colour.map(|v| v.saturating_add(noise)))
                    });
                    let ext = if i % 2 == 0 { "png" } else { "jpg" };
                    img.save(dir.join(format!("img{i}.{ext}"))).unwrap();
                }
            }
        }
    }

    /// Write a small ImageFolder whose classes are shapes, not colours: horizontal, vertical
    /// and diagonal stripes, then a checkerboard (`classes` of them), in `colour` on black, at
    /// varied sizes, periods and phases. Telling them apart takes oriented-edge features.
    pub fn write_pattern_folder(root: &Path, classes: usize, train_per_class: usize, val_per_class: usize, colour: [u8; 3]) {
        for (split, n, salt) in [("train", train_per_class, 0u32), ("val", val_per_class, 1000)] {
            for c in 0..classes {
                let dir = root.join(split).join(format!("pattern{c}"));
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..n as u32 {
                    let (w, h) = (60 + 13 * (i % 5), 50 + 17 * (i % 3));
                    let (period, phase) = (6 + (i + salt) % 7, (i * 5 + salt) % 11);
                    let img = image::RgbImage::from_fn(w, h, |x, y| {
                        let on = match c {
                            0 => (y + phase) % period < period / 2,
                            1 => (x + phase) % period < period / 2,
                            2 => (x + y + phase) % period < period / 2,
                            _ => ((x + phase) / (period / 2).max(1) + y / (period / 2).max(1)) % 2 == 0,
                        };
                        image::Rgb(if on { colour } else { [0, 0, 0] })
                    });
                    img.save(dir.join(format!("img{i}.png"))).unwrap();
                }
            }
        }
    }

    #[test]
    fn scans_classes_in_sorted_order_and_rejects_bad_layouts() {
        let dir = tempfile::tempdir().unwrap();
        write_colour_folder(dir.path(), 3, 4, 2);
        std::fs::write(dir.path().join("train/class0/notes.txt"), "not an image").unwrap();
        let f = scan(dir.path()).unwrap();
        assert_eq!(f.classes, ["class0", "class1", "class2"]);
        assert_eq!((f.train.len(), f.val.len()), (12, 6));
        assert_eq!(f.train[4].label, 1);
        assert!(f.train.iter().all(|s| is_image(&s.path)));

        std::fs::create_dir(dir.path().join("train/empty")).unwrap();
        let err = format!("{:#}", scan(dir.path()).unwrap_err());
        assert!(err.contains("empty") && err.contains("no .jpg"), "{err}");
        std::fs::remove_dir(dir.path().join("train/empty")).unwrap();

        std::fs::create_dir(dir.path().join("val/zebra")).unwrap();
        std::fs::copy(&f.val[0].path, dir.path().join("val/zebra/a.png")).unwrap();
        let err = format!("{:#}", scan(dir.path()).unwrap_err());
        assert!(err.contains("validation class 'zebra'"), "{err}");
        let err = format!("{:#}", scan(&dir.path().join("train")).unwrap_err());
        assert!(err.contains("not an ImageFolder"), "{err}");
    }
}
