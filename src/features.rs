//! `alexnet features`: the activations of any layer for a set of images (the evaluation split
//! of a dataset, or image files), as the embeddings people use AlexNet for today, written as
//! safetensors or as `.npy` files numpy reads without extra packages.

use crate::files::{f32_bytes, safetensors_bytes, write_atomic};
use crate::model::{Mode, Model, Workspace, forward};
use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::tensor::{Dtype, TensorView};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One row of `dim` values per sample, with its label (-1: none) and name.
pub struct Features {
    pub layer: String,
    pub dim: usize,
    pub values: Vec<f32>,
    pub labels: Vec<i64>,
    pub names: Vec<String>,
}

/// Layer `layer`'s output for `count` samples in batches of `batch`; `fill(range, input)` writes
/// samples `range` into the input buffer.
pub fn extract(
    model: &Model,
    layer: usize,
    count: usize,
    batch: usize,
    mut fill: impl FnMut(Range<usize>, &mut [f32]) -> Result<()>,
) -> Result<(usize, Vec<f32>)> {
    let dim: usize = model.shapes[layer + 1].iter().product();
    let mut ws = Workspace::keeping_outputs(model, batch.min(count).max(1));
    let bar = ProgressBar::new(count as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} images  ETA {eta}").expect("valid template"));
    let mut values = Vec::with_capacity(count * dim);
    for start in (0..count).step_by(ws.batch) {
        let n = ws.batch.min(count - start);
        fill(start..start + n, ws.input_mut())?;
        forward(model, &mut ws, n, Mode::Eval);
        values.extend_from_slice(ws.layer_output(model, layer, n));
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok((dim, values))
}

/// `.npy` (format 1.0) bytes of a C-order array of `shape` with numpy type `descr`.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// Write `f` to `out`: a safetensors file (`features` [N, D] f32, `labels` [N] i64, the names
/// and layer in its metadata), or, for `.npy`, `out` itself (the features) beside
/// `STEM.labels.npy` and `STEM.names.txt`. Returns the paths written.
pub fn write(f: &Features, out: &Path) -> Result<Vec<PathBuf>> {
    let n = f.labels.len();
    let values = f32_bytes(&f.values);
    let labels: Vec<u8> = f.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    if out.extension().is_some_and(|e| e == "npy") {
        let stem = out.with_extension("");
        let (labels_path, names_path) = (stem.with_extension("labels.npy"), stem.with_extension("names.txt"));
        write_atomic(out, &npy("<f4", &[n, f.dim], &values))?;
        write_atomic(&labels_path, &npy("<i8", &[n], &labels))?;
        write_atomic(&names_path, f.names.iter().map(|s| format!("{s}\n")).collect::<String>().as_bytes())?;
        return Ok(vec![out.to_path_buf(), labels_path, names_path]);
    }
    if out.extension().is_none_or(|e| e != "safetensors") {
        bail!("--out {}: name a .safetensors or a .npy file", out.display());
    }
    let views =
        [("features", TensorView::new(Dtype::F32, vec![n, f.dim], &values)?), ("labels", TensorView::new(Dtype::I64, vec![n], &labels)?)];
    let meta = [("layer".to_string(), f.layer.clone()), ("names".to_string(), serde_json::to_string(&f.names)?)].into_iter().collect();
    write_atomic(out, &safetensors_bytes(views, meta)?)?;
    Ok(vec![out.to_path_buf()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header numpy's `np.load` reads: magic, version 1.0, a 64-byte-aligned dict.
    #[test]
    fn npy_headers_are_numpys() {
        let b = npy("<f4", &[2, 3], &f32_bytes(&[1.0; 6]));
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }") && header.ends_with('\n'), "{header}");
        assert_eq!(b.len(), 10 + len + 24);
        assert!(String::from_utf8_lossy(&npy("<i8", &[5], &[0; 40])).contains("'shape': (5,)"));
    }
}
