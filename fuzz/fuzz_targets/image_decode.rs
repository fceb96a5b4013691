//! Image files: any bytes give an 8-bit RGB image of a usable size or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = simclr::data::decode_bytes(data, std::path::Path::new("fuzz.img")) {
        assert!(image.width() >= simclr::checks::MIN_IMAGE_SIDE && image.height() >= simclr::checks::MIN_IMAGE_SIDE);
    }
});
