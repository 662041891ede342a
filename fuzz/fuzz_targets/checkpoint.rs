//! The model-file loader on arbitrary bytes: the architecture in the metadata, the tensors'
//! names, shapes and values, with and without optimiser state.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    let _ = alexnet::checkpoint::load_bytes(path, data, None);
});
