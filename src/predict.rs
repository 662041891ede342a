//! Turning an arbitrary photo or scan of a digit into an MNIST-style input: MNIST digits are
//! light on dark, size-normalised to fit a 20x20 box (aspect kept), and placed in a 28x28
//! field with their centre of mass at the centre (LeCun et al.'s preprocessing). And image files
//! in general as a model takes them (`prepare_images`).

use crate::data::pipeline::FolderData;
use crate::model::Model;
use anyhow::{Context, Result, bail};
use image::imageops::{FilterType, resize};
use image::{GrayImage, Luma};
use std::path::{Path, PathBuf};

/// Pixels above this (in [0, 1], after making ink light) count as ink for the bounding box.
const INK: f32 = 0.2;

/// Image files as `model` takes them, one after another: digits prepared as `load_digit` does
/// for the 28x28 seed model; for the ImageNet models as an ImageFolder dataset prepares its
/// validation images (centre crop, less `folder`'s mean image), so they need `folder`.
pub fn prepare_images(model: &Model, images: &[PathBuf], folder: Option<&FolderData>) -> Result<Vec<f32>> {
    if model.arch.input == [28, 28, 1] {
        return Ok(images.iter().map(|p| load_digit(p)).collect::<Result<Vec<_>>>()?.concat());
    }
    let Some(folder) = folder else {
        bail!("model {} prepares images with an ImageFolder dataset's mean image: give --data DIR", model.arch.name)
    };
    let mut inputs = vec![0.0; images.len() * model.input_len()];
    folder.fill_files(images, &mut inputs)?;
    Ok(inputs)
}

/// Load `path` and return 28x28 pixels in [0, 1], row-major.
pub fn load_digit(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    digit_from_bytes(&bytes).with_context(|| format!("image {}", path.display()))
}

/// Decode a PNG or JPEG held in memory and prepare it as `load_digit` does. Decoding is
/// limited to 8192x8192 pixels and 512 MiB, so a small hostile file cannot claim huge memory.
pub fn digit_from_bytes(bytes: &[u8]) -> Result<Vec<f32>> {
    mnist_preprocess(&crate::data::decode_image(bytes, 8192, 512 << 20)?.to_luma8())
}

pub fn mnist_preprocess(img: &GrayImage) -> Result<Vec<f32>> {
    let (w, h) = img.dimensions();
    // Make the digit light on dark: if the border is mostly bright, the ink is dark.
    let border: Vec<u8> =
        img.enumerate_pixels().filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h).map(|(_, _, p)| p[0]).collect();
    let invert = border.iter().map(|&v| v as u32).sum::<u32>() > 127 * border.len() as u32;
    let ink = GrayImage::from_fn(w, h, |x, y| {
        let v = img.get_pixel(x, y)[0];
        Luma([if invert { 255 - v } else { v }])
    });
    let thr = (INK * 255.0) as u8;
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in ink.enumerate_pixels() {
        if p[0] > thr {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    // Checked at every size, 28x28 included: a blank image has no digit to classify.
    if x0 == u32::MAX {
        bail!("no digit found: the image is blank");
    }
    if (w, h) == (28, 28) {
        // Already in MNIST's frame: use as is rather than resample.
        return Ok(ink.pixels().map(|p| p[0] as f32 / 255.0).collect());
    }
    let crop = image::imageops::crop_imm(&ink, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();
    let (cw, ch) = crop.dimensions();
    let scale = 20.0 / cw.max(ch) as f32;
    let (nw, nh) = (((cw as f32 * scale).round() as u32).clamp(1, 20), ((ch as f32 * scale).round() as u32).clamp(1, 20));
    let small = resize(&crop, nw, nh, FilterType::Triangle);
    // Centre of mass of the resized digit, to be placed at (14, 14).
    let (mut m, mut mx, mut my) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y, p) in small.enumerate_pixels() {
        let v = p[0] as f32;
        (m, mx, my) = (m + v, mx + v * x as f32, my + v * y as f32);
    }
    let (cx, cy) = if m > 0.0 { (mx / m, my / m) } else { (nw as f32 / 2.0, nh as f32 / 2.0) };
    let ox = ((14.0 - cx).round() as i64).clamp(0, 28 - nw as i64);
    let oy = ((14.0 - cy).round() as i64).clamp(0, 28 - nh as i64);
    let mut out = vec![0.0; 784];
    for (x, y, p) in small.enumerate_pixels() {
        out[(oy as usize + y as usize) * 28 + ox as usize + x as usize] = p[0] as f32 / 255.0;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dark_ink_on_white_is_inverted_boxed_and_centred() {
        // A 100x60 white canvas with a black 10x40 bar: becomes a light bar 20 tall, centred.
        let img = GrayImage::from_fn(100, 60, |x, y| Luma([if (30..40).contains(&x) && (10..50).contains(&y) { 0 } else { 255 }]));
        let d = mnist_preprocess(&img).unwrap();
        let rows: Vec<usize> = (0..28).filter(|y| (0..28).any(|x| d[y * 28 + x] > 0.5)).collect();
        assert_eq!(rows.len(), 20);
        let (mut m, mut cy, mut cx) = (0.0, 0.0, 0.0);
        for y in 0..28 {
            for x in 0..28 {
                m += d[y * 28 + x];
                cy += d[y * 28 + x] * y as f32;
                cx += d[y * 28 + x] * x as f32;
            }
        }
        assert!((cy / m - 14.0).abs() <= 1.0 && (cx / m - 14.0).abs() <= 1.0, "centre {} {}", cx / m, cy / m);
        assert!(mnist_preprocess(&GrayImage::new(50, 50)).unwrap_err().to_string().contains("blank"));
    }
}
