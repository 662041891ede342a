//! File helpers shared by every module that writes: atomic writes, f32 tensors as bytes, and
//! byte-reproducible safetensors files.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// f32 values as the little-endian bytes safetensors and ONNX store.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of `f32_bytes` (a trailing partial value is ignored).
pub fn f32s_from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
}

/// A safetensors file of `views` and `meta`, its JSON header's keys sorted.
/// `safetensors::serialize` writes the metadata in `HashMap` order, which changes from process
/// to process; sorted, the same tensors give the same bytes, so a file's checksum identifies
/// its model. Sorting keeps the header's length (same keys and values): the data offsets stand.
pub fn safetensors_bytes<S, V, I>(views: I, meta: HashMap<String, String>) -> Result<Vec<u8>>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    let mut file = safetensors::serialize(views, Some(meta))?;
    let len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let header = &file[8..8 + len];
    let mut top: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)?;
    if let Some(meta) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(meta.take())?;
        *meta = serde_json::to_value(sorted)?;
    }
    let json = serde_json::to_vec(&top)?;
    anyhow::ensure!(json.len() <= len, "safetensors header grew when sorted ({} > {len} bytes)", json.len());
    // safetensors pads the header with spaces to an 8-byte boundary; keep its length.
    file[8..8 + json.len()].copy_from_slice(&json);
    file[8 + json.len()..8 + len].fill(b' ');
    Ok(file)
}

/// The metadata of a safetensors file (step, accuracy, ... as written by `extra`).
pub fn metadata(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Temporary files of `write_atomic` start with this; a resumed run deletes any a killed
/// process left behind.
pub const TEMP_PREFIX: &str = ".alexnet-tmp";

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsynced, then
/// renamed over the target, so a crash at any instant leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(TEMP_PREFIX);
    #[cfg(unix)]
    {
        // tempfile creates 0600 files; a model or config is an ordinary file others may read.
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(dir).with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes).and_then(|_| tmp.as_file().sync_all()).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("cannot rename the temporary file onto {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Make the rename itself durable; not all filesystems allow syncing a directory.
        let _ = d.sync_all();
    }
    Ok(())
}
