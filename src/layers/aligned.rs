//! Buffers that start on a cache line: what a layer writes with whole-line streaming stores
//! (`simd::stream_copy`) has to line up with the lines for every row to be whole lines.

use std::ops::{Deref, DerefMut};

/// The bytes of a cache line.
pub const LINE: usize = 64;

/// `len` values of `T`, zeroed at first, the first on a 64-byte boundary. (With glibc a `Vec`
/// of a megabyte or more comes from `mmap`, 16 bytes past a page's start: each 256-byte row of
/// the seed model's pooled conv1 output then touches five cache lines, not four.)
#[derive(Debug, Default)]
pub struct AlignedBuf<T> {
    storage: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedBuf<T> {
    pub fn zeroed(len: usize) -> AlignedBuf<T> {
        if len == 0 {
            return AlignedBuf { storage: Vec::new(), start: 0, len };
        }
        // Any `T` the engine keeps (f32, u8) divides a line, so some start within the slack is
        // on a line's boundary.
        let slack = LINE / size_of::<T>();
        let storage = vec![T::default(); len + slack];
        let start = storage.as_ptr().align_offset(LINE);
        assert!(start <= slack, "a start on a cache line within {slack} values");
        AlignedBuf { storage, start, len }
    }
}

impl<T: Copy + Default> Clone for AlignedBuf<T> {
    /// A new allocation lines up anew.
    fn clone(&self) -> AlignedBuf<T> {
        let mut copy = AlignedBuf::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl<T> Deref for AlignedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl<T> DerefMut for AlignedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_cache_line_zeroed_whatever_the_length() {
        for len in [0, 1, 15, 16, 17, 1000, 1 << 20] {
            let floats = AlignedBuf::<f32>::zeroed(len);
            let bytes = AlignedBuf::<u8>::zeroed(len);
            assert_eq!((floats.len(), bytes.len()), (len, len));
            assert!(floats.iter().all(|&v| v == 0.0) && bytes.iter().all(|&v| v == 0));
            if len > 0 {
                assert_eq!(floats.as_ptr() as usize % LINE, 0, "{len} floats");
                assert_eq!(bytes.as_ptr() as usize % LINE, 0, "{len} bytes");
            }
            let mut copy = floats.clone();
            assert_eq!(&copy[..], &floats[..]);
            if len > 0 {
                copy[len - 1] = 1.0;
                assert_eq!(copy.as_ptr() as usize % LINE, 0);
                assert_eq!(floats[len - 1], 0.0, "the clone is its own buffer");
            }
        }
    }
}
