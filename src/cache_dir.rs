//! The user's cache directory for what alexnet measures or computes once per machine or
//! dataset (convolution algorithm choices, ImageFolder statistics), kept out of the datasets
//! themselves so a read-only dataset works.

use std::path::PathBuf;

/// `$ALEXNET_CACHE_DIR`, else `$XDG_CACHE_HOME/alexnet`, else `~/.cache/alexnet`; `None` where
/// none can be named (then nothing is cached).
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("ALEXNET_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("alexnet")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("alexnet")))
}
