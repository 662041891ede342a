//! `predict`'s image decoding and MNIST-style preprocessing on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pixels) = alexnet::predict::digit_from_bytes(data) {
        assert_eq!(pixels.len(), 28 * 28);
        assert!(pixels.iter().all(|p| (0.0..=1.0).contains(p)));
    }
});
