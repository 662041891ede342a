//! Per-thread scratch buffers for the kernels' temporaries (im2col patches, Winograd tiles).
//! Pool threads live for the whole run, so each buffer grows once and is then reused: no
//! allocation or page faulting in the steady state.

use super::aligned::LINE;
use std::cell::RefCell;
use std::thread::LocalKey;

thread_local! {
    pub static SCRATCH_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    pub static SCRATCH_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    pub static SCRATCH_C: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on the first `len` elements of this thread's buffer `key` (contents unspecified).
pub fn with_scratch<R>(key: &'static LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    key.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Buffers shared across threads (gradient partials that one thread reduces after a parallel
/// section), recycled between calls so steady-state steps allocate nothing.
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// A zeroed buffer of `len` floats, reusing a returned one when possible.
pub fn take_zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// A buffer of `len` floats with unspecified contents (for outputs written before read).
pub fn take(len: usize) -> Vec<f32> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    // Best fit, so small requests do not take the large buffers the large requests need.
    let best = pool.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
    let mut v = match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::with_capacity(len),
    };
    drop(pool);
    v.truncate(len);
    v.resize(len, 0.0);
    v
}

/// Return a buffer from `take_zeroed` for reuse.
pub fn give_back(v: Vec<f32>) {
    // Empty vectors (placeholders for partials not wanted) would only take the pool's places.
    if v.capacity() == 0 {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < 64 {
        pool.push(v);
    }
}

/// Floats a buffer needs past `len` for `aligned` to find `len` of them on a cache line's start.
pub const ALIGN_SLACK: usize = LINE / size_of::<f32>();

/// The `len` floats of `buf` (`len + ALIGN_SLACK` or more) that start on a 64-byte boundary, so
/// that a vector load at a multiple of 16 floats from there never spans two cache lines (which
/// makes it two loads: a fifth of the seed model's conv1 forward with its weights 16 bytes off).
pub fn aligned(buf: &mut [f32], len: usize) -> &mut [f32] {
    let at = buf.as_ptr().align_offset(LINE);
    let at = if at <= ALIGN_SLACK { at } else { 0 };
    &mut buf[at..at + len]
}

/// `values` copied into `buf` (`values.len() + ALIGN_SLACK` or more) on a cache line's start.
pub fn aligned_copy<'a>(buf: &'a mut [f32], values: &[f32]) -> &'a mut [f32] {
    let copy = aligned(buf, values.len());
    copy.copy_from_slice(values);
    copy
}
