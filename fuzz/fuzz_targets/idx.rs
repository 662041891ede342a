//! The IDX reader (raw or gzipped) on arbitrary bytes: an error, never a panic or a blow-up.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.idx");
    let bytes = alexnet::data::idx::decompress(path, data.to_vec());
    if let Ok(bytes) = bytes {
        for rank in [1, 3] {
            let _ = alexnet::data::idx::parse(path, &bytes, rank);
        }
    }
});
