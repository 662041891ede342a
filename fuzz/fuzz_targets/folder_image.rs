//! The ImageFolder pipeline's decode, centre-square crop and resize on arbitrary bytes: bounded
//! time and memory (run.sh caps RSS), and a 256x256 RGB image out whenever it decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pixels) = alexnet::data::pipeline::prepare(data, 256) {
        assert_eq!(pixels.len(), 256 * 256 * 3);
        assert!(pixels.iter().all(|p| (0.0..=255.0).contains(p)));
    }
});
