//! Epoch order and batch assembly.

use super::mnist::Dataset;
use crate::rng::{stream_id, substream};
use rand_xoshiro::rand_core::Rng;

/// The order of the training set in `epoch`: a Fisher-Yates shuffle from a generator seeded
/// by (seed, epoch), so any epoch's order can be recomputed (what resume needs).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut rng = substream(stream_id(&[seed, epoch, 0x5348_5546]), 0);
    let mut order: Vec<u32> = (0..len as u32).collect();
    for i in (1..len).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Copy the images `indices` into `input` (NHWC, one channel) and their labels into `labels`.
/// With `shift > 0` each image is translated by a random (dx, dy) in [-shift, shift]^2, drawn
/// per image from `stream` (which the caller derives from seed and epoch), zero-filled: the
/// paper's translation augmentation adapted to centred digits.
pub fn fill_batch(ds: &Dataset, indices: &[u32], shift: usize, stream: u64, input: &mut [f32], labels: &mut Vec<u32>) {
    let (rows, cols) = (ds.rows as isize, ds.cols as isize);
    labels.clear();
    for (slot, &i) in indices.iter().enumerate() {
        let src = ds.image(i as usize);
        let dst = &mut input[slot * ds.image_len()..(slot + 1) * ds.image_len()];
        labels.push(ds.labels[i as usize]);
        if shift == 0 {
            dst.copy_from_slice(src);
            continue;
        }
        let mut rng = substream(stream, i as u64);
        let span = 2 * shift as u64 + 1;
        let dx = (rng.next_u64() % span) as isize - shift as isize;
        let dy = (rng.next_u64() % span) as isize - shift as isize;
        for y in 0..rows {
            let sy = y - dy;
            let row = &mut dst[(y * cols) as usize..((y + 1) * cols) as usize];
            if !(0..rows).contains(&sy) {
                row.fill(0.0);
                continue;
            }
            for (x, v) in row.iter_mut().enumerate() {
                let sx = x as isize - dx;
                *v = if (0..cols).contains(&sx) { src[(sy * cols + sx) as usize] } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(1000, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 1, 0));
        assert_ne!(a, epoch_order(1000, 1, 1));
        assert_ne!(a, epoch_order(1000, 2, 0));
    }

    #[test]
    fn shifts_translate_within_bounds_and_keep_labels() {
        // One bright pixel at the centre of a 5x5 image moves by at most 2 in each direction.
        let mut images = vec![0.0; 2 * 25];
        images[12] = 1.0;
        images[25 + 12] = 1.0;
        let ds = Dataset { images, labels: vec![3, 4], rows: 5, cols: 5, channels: 1 };
        let mut seen = std::collections::HashSet::new();
        for stream in 0..200 {
            let (mut input, mut labels) = (vec![0.0; 50], Vec::new());
            fill_batch(&ds, &[1, 0], 2, stream, &mut input, &mut labels);
            assert_eq!(labels, vec![4, 3]);
            let pos = input[..25].iter().position(|&v| v == 1.0).unwrap();
            assert_eq!(input.iter().filter(|&&v| v == 1.0).count(), 2);
            seen.insert(pos);
        }
        assert_eq!(seen.len(), 25, "every shift in [-2, 2]^2 occurs");
    }
}
