//! An advisory lock on a run directory for the life of a run, so two `train` processes never
//! write into one directory at once. The operating system drops the lock when the holder exits
//! in any way (kill -9 included), so a stale lock from a killed run is simply taken over.

use anyhow::{Context, Result, bail};
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Held while a run writes into its directory; released on drop or process exit.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

const LOCK_FILE: &str = ".alexnet.lock";

/// Lock `dir` (which must exist) for this process, or fail at once naming the holder's pid.
pub fn lock_run_dir(dir: &Path) -> Result<RunLock> {
    let path = dir.join(LOCK_FILE);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok();
            bail!(
                "{} is in use by another training run (pid {}): wait for it to finish, or pick another --out",
                dir.display(),
                holder.trim()
            );
        }
        Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| write!(file, "{}", std::process::id()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(RunLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_released_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_run_dir(dir.path()).unwrap();
        let err = format!("{:#}", lock_run_dir(dir.path()).unwrap_err());
        assert!(err.contains("in use by another training run") && err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(held);
        lock_run_dir(dir.path()).expect("a released lock is free again");
    }
}
