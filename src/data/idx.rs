//! The IDX format of the MNIST files (raw or gzipped): a big-endian magic number whose third
//! byte is the element type (0x08 = u8) and fourth the rank, then one u32 per dimension, then
//! the data.

use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    // The OS reason is the source, printed once after this by `{:#}`.
    #[error("{path}: cannot read")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
}

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Read the whole file, gunzipping it if it starts with the gzip magic.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, IdxError> {
    let io = |source| IdxError::Io { path: path.to_path_buf(), source };
    decompress(path, std::fs::read(path).map_err(io)?)
}

/// Gunzip `raw` if it starts with the gzip magic, else return it as is.
pub fn decompress(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, IdxError> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| IdxError::Format { path: path.to_path_buf(), what: format!("corrupt or truncated gzip data: {e}") })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse a u8 IDX array of the given rank.
pub fn parse(path: &Path, bytes: &[u8], rank: usize) -> Result<IdxArray, IdxError> {
    let bad = |what: String| IdxError::Format { path: path.to_path_buf(), what };
    if bytes.len() < 4 {
        return Err(bad(format!("file is {} bytes, too short for an IDX header", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != rank {
        return Err(bad(format!(
            "bad magic number 0x{:02x}{:02x}{:02x}{:02x}: expected 0x000008{rank:02x} (unsigned bytes, {rank} dimensions)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(bad(format!("truncated header: {} bytes, need {header}", bytes.len())));
    }
    let dims: Vec<usize> = (0..rank).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let len = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let body = &bytes[header..];
    if body.len() != len {
        return Err(bad(format!("dimensions {dims:?} need {len} data bytes, file has {} (truncated or corrupt)", body.len())));
    }
    Ok(IdxArray { dims, data: body.to_vec() })
}

pub fn read(path: &Path, rank: usize) -> Result<IdxArray, IdxError> {
    parse(path, &read_bytes(path)?, rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(rank: u8, dims: &[u32]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, rank];
        dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
        v
    }

    #[test]
    fn parses_valid_and_rejects_bad_magic_and_wrong_sizes() {
        let p = Path::new("x.idx");
        let mut ok = header(3, &[2, 2, 3]);
        ok.extend(0..12u8);
        let a = parse(p, &ok, 3).unwrap();
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.data[11], 11);
        let mut bad_magic = ok.clone();
        bad_magic[2] = 0x0d;
        assert!(parse(p, &bad_magic, 3).unwrap_err().to_string().contains("bad magic"));
        assert!(parse(p, &ok, 1).unwrap_err().to_string().contains("bad magic"));
        assert!(parse(p, &ok[..ok.len() - 1], 3).unwrap_err().to_string().contains("truncated"));
        assert!(parse(p, &ok[..6], 3).unwrap_err().to_string().contains("truncated header"));
    }

    #[test]
    fn truncated_gzip_is_an_error_naming_the_file() {
        use flate2::{Compression, write::GzEncoder};
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mut raw = header(1, &[5000]);
        raw.extend((0..5000).map(|i| (i % 10) as u8));
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&raw).unwrap();
        let gz = enc.finish().unwrap();
        let path = dir.path().join("labels.gz");
        std::fs::write(&path, &gz).unwrap();
        assert_eq!(read(&path, 1).unwrap().data.len(), 5000);
        std::fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        let err = read(&path, 1).unwrap_err().to_string();
        assert!(err.contains("labels.gz") && err.contains("gzip"), "{err}");
    }
}
