//! CIFAR-10/100 binary batches: any bytes give records or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for label_bytes in [1, 2] {
        if let Ok(records) = simclr::data::cifar_binary::parse_batch(data, label_bytes) {
            assert_eq!(records.len(), data.len() / (label_bytes + 3072));
        }
    }
});
