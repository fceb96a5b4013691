//! Safetensors files (weights, checkpoints): any bytes give tensors or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = simclr::io::load_bytes(data, std::path::Path::new("fuzz.safetensors"));
});
