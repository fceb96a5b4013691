//! Run configurations: any text gives a validated config or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = std::path::Path::new("fuzz.toml");
        if let Ok(config) = simclr::config::RunConfig::default().with_toml(text, path) {
            let _ = config.validate();
        }
    }
});
