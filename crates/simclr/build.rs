//! * Compiles the c10d shim (src/dist/c10d.cpp) against libtorch's headers,
//!   as torch-sys compiles its own wrapper, and links it into the crate;
//!   with the `cuda` feature, with its NCCL backend too, against the CUDA and
//!   NCCL headers `scripts/cuda-headers.sh` installs (SIMCLR_CUDA_INCLUDE).
//! * Compiles src/jit.cpp (a pass on TorchScript modules tch does not bind,
//!   for `simclr export`) into the same library.
//! * With the `cuda` feature, compiles src/cuda_memory.cpp (the CUDA caching
//!   allocator's peak memory) into the same library and links libc10_cuda.
//! * Embeds libtorch's library folder as an rpath in this crate's test and
//!   bench binaries, so they run without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=SIMCLR_CUDA_INCLUDE");
    println!("cargo:rerun-if-changed=src/dist/c10d.cpp");
    println!("cargo:rerun-if-changed=src/dist/include");
    println!("cargo:rerun-if-changed=src/jit.cpp");
    println!("cargo:rerun-if-changed=src/guarded.h");
    println!("cargo:rerun-if-changed=src/cuda_memory.cpp");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: build through ./x.sh, or set it as `scripts/libtorch.sh` prints");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/dist/c10d.cpp")
        .file("src/jit.cpp")
        .include("src/dist/include")
        .include(format!("{libtorch}/include"))
        .include(format!("{libtorch}/include/torch/csrc/api/include"))
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        // at::parallel_for is OpenMP in the wheel's libtorch (ATen/Config.h:
        // AT_PARALLEL_OPENMP), compiled into the shim's own kernels; without
        // the flag they would run on one thread.
        .flag("-fopenmp")
        // libtorch's headers warn by the hundred; the shim's own code is small.
        .warnings(false)
        .extra_warnings(false);
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let Ok(include) = std::env::var("SIMCLR_CUDA_INCLUDE") else {
            panic!(
                "the cuda build compiles NCCL's process group against CUDA's and NCCL's headers: \
                 build through `./x.sh build-cuda`, or set SIMCLR_CUDA_INCLUDE as `scripts/cuda-headers.sh` prints"
            );
        };
        for folder in include.split(':').filter(|folder| !folder.is_empty()) {
            build.include(folder);
        }
        build.define("USE_C10D_NCCL", None).define("USE_CUDA", None).define("SIMCLR_NCCL", None);
        build.file("src/cuda_memory.cpp");
    }
    build.compile("simclr_c10d");
    // The OpenMP runtime libtorch itself loads (the wheel's own libgomp), so
    // that the process has one; after the shim, which needs it.
    println!("cargo:rustc-link-search=native={libtorch}/lib");
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // After the library that needs it, as the linker resolves in order.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
