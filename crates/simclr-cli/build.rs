//! Link settings for the `simclr` binary.
//!
//! * An rpath to libtorch's library folder, so the binary runs without
//!   LD_LIBRARY_PATH.
//! * With the `cuda` feature, libtorch_cuda.so is kept linked. Nothing in our
//!   code references its symbols, so `--as-needed` drops it and CUDA is then
//!   never available at run time (verified). Without the feature the binary
//!   does not depend on it, and runs where the CUDA libraries are absent.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
