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
    let mut v = match pick(pool.iter().map(|v| (v.len(), v.capacity())), len) {
        Some(i) => pool.remove(i),
        None => Vec::with_capacity(len),
    };
    drop(pool);
    v.truncate(len);
    v.resize(len, 0.0);
    v
}

/// Which pooled buffer, given as (length, capacity), serves a request for `len` floats: one of
/// the request's size class (capacity `len` to `2 len`); of those, one last taken at exactly
/// `len` (this request's own buffer from the last step), else one whose length covers `len`
/// (a returned buffer keeps the length it was taken at, all of it written, so nothing is
/// zero-filled), else the smallest; none, and a new one is made, when none is of the class.
/// So in the steady state each request a step makes finds its own buffer again. Fitted by
/// capacity alone, small requests took and shortened the large buffers, and the large requests
/// then zero-filled them again: 13 MB a seed-model training step (0.84 ms of ~60 on two Zen 4
/// threads; none now) and 58 MB an AlexNet step at batch 16 (15 now, where requests of one
/// length overlap and take each other's buffers; peak memory 1,205 MiB, was 1,166).
fn pick(buffers: impl Iterator<Item = (usize, usize)>, len: usize) -> Option<usize> {
    let in_class = |capacity: usize| capacity >= len && capacity <= len.max(1) * 2;
    buffers
        .enumerate()
        .filter(|&(_, (_, capacity))| in_class(capacity))
        .min_by_key(|&(_, (length, capacity))| (length != len, length < len, capacity))
        .map(|(i, _)| i)
}

/// Buffers the pool keeps at most; past it the least recently returned one makes room.
const POOL_BUFFERS: usize = 64;

/// Return a buffer from `take_zeroed` for reuse.
pub fn give_back(v: Vec<f32>) {
    // Empty vectors (placeholders for partials not wanted) would only take the pool's places.
    if v.capacity() == 0 {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() == POOL_BUFFERS {
        pool.remove(0);
    }
    pool.push(v);
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

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn pick_keeps_to_the_size_class_and_prefers_the_buffer_last_taken_at_the_same_length() {
        // (length, capacity) of the pooled buffers.
        let pool = [(1000, 1000), (10, 16), (40, 40), (5, 20), (24, 24), (12, 24)];
        let picked = |len| pick(pool.iter().copied(), len);
        assert_eq!(picked(10), Some(1), "the one last taken at 10");
        assert_eq!(picked(12), Some(5), "the one last taken at 12, not a smaller one");
        assert_eq!(picked(15), Some(4), "24 written beat 16 of capacity with 10 written");
        assert_eq!(picked(18), Some(4));
        assert_eq!(picked(30), Some(2));
        assert_eq!(picked(600), Some(0));
        assert_eq!(picked(100), None, "1000 floats are more than twice 100: a new buffer");
        assert_eq!(picked(2000), None);
        assert_eq!(picked(0), None, "nothing has capacity 0 to 2");
    }
}
