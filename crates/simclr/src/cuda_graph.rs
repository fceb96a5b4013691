//! CUDA graphs: GPU work captured once and then replayed as one launch, so
//! that the host's time to issue its kernels drops out.
//!
//! libtorch's `at::cuda::CUDAGraph` does the capture, with the caching
//! allocator's private pool for the memory the work allocates. tch binds
//! none of it, and its headers need CUDA's, which a CPU build does not
//! have, so the calls go through a small C++ library, `crates/simclr/src/cuda_graph.cpp`
//! (built beside the CUDA binary by `./x.sh build-cuda`), loaded
//! at run time from a path the caller gives. Nothing else depends on it.
//!
//! Training replays its steps from one with `train.cuda_graph` (see
//! `train::graph`); `simclr bench --cuda-graph` uses it to time the training
//! step replayed: the step with nothing left but its kernels, against which
//! the eager step's launch overhead shows. Capture also proves the step free of host-device
//! synchronisation: CUDA refuses any during a capture. On an H200 the
//! ResNet-18 step at 256 images captured, and replayed in 8.5 ms against
//! 8.9 ms eager (`benchmarks/h200-2026-11-28`).
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use tch::Device;

use crate::{Error, Result};

/// A shim call on a capture handle: 0, or 1 with the reason in `last_error`.
type Call = unsafe extern "C" fn(*mut c_void) -> c_int;

/// The shim's entry points (see `crates/simclr/src/cuda_graph.cpp`).
struct Library {
    last_error: unsafe extern "C" fn() -> *const c_char,
    new: unsafe extern "C" fn(*mut *mut c_void) -> c_int,
    free: unsafe extern "C" fn(*mut c_void),
    enter_side_stream: unsafe extern "C" fn(*mut c_void, c_int) -> c_int,
    leave_side_stream: Call,
    capture_begin: Call,
    capture_end: Call,
    replay: Call,
}

impl Library {
    /// Loads the shim at `path`. It stays loaded for the process's life:
    /// graphs made through it may outlive any one handle.
    fn open(path: &Path) -> Result<Self> {
        let unusable = |why: String| {
            Error::Device(format!(
                "{}: not a usable CUDA graph library ({why}); build it with ./x.sh build-cuda",
                path.display()
            ))
        };
        let name = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| unusable(e.to_string()))?;
        // SAFETY: dlopen and dlerror with a valid C string; the handle is
        // checked before use and never closed.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns null or a C string owned by libc.
            let why = unsafe { libc::dlerror() };
            let why = if why.is_null() {
                "dlopen failed".to_owned()
            } else {
                // SAFETY: as above.
                unsafe { CStr::from_ptr(why) }.to_string_lossy().into_owned()
            };
            return Err(unusable(why));
        }
        let symbol = |name: &str| -> Result<*mut c_void> {
            let c_name = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: dlsym on a live handle with a valid C string.
            let address = unsafe { libc::dlsym(handle, c_name.as_ptr()) };
            if address.is_null() {
                Err(unusable(format!("it has no {name}")))
            } else {
                Ok(address)
            }
        };
        // SAFETY: each symbol is the extern "C" function of that name in
        // crates/simclr/src/cuda_graph.cpp, whose signature the target type repeats.
        unsafe {
            use std::mem::transmute;
            Ok(Self {
                last_error: transmute::<*mut c_void, unsafe extern "C" fn() -> *const c_char>(symbol(
                    "simclr_graph_last_error",
                )?),
                new: transmute::<*mut c_void, unsafe extern "C" fn(*mut *mut c_void) -> c_int>(symbol(
                    "simclr_graph_new",
                )?),
                free: transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void)>(symbol("simclr_graph_free")?),
                enter_side_stream: transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void, c_int) -> c_int>(symbol(
                    "simclr_graph_enter_side_stream",
                )?),
                leave_side_stream: transmute::<*mut c_void, Call>(symbol("simclr_graph_leave_side_stream")?),
                capture_begin: transmute::<*mut c_void, Call>(symbol("simclr_graph_capture_begin")?),
                capture_end: transmute::<*mut c_void, Call>(symbol("simclr_graph_capture_end")?),
                replay: transmute::<*mut c_void, Call>(symbol("simclr_graph_replay")?),
            })
        }
    }

    /// A shim call's status as a result, with its message when it failed.
    fn check(&self, what: &str, status: c_int) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the shim returns a pointer into its thread-local string.
        let message = unsafe { CStr::from_ptr((self.last_error)()) }.to_string_lossy().into_owned();
        Err(Error::Torch(tch::TchError::Torch(format!("CUDA graph {what}: {message}"))))
    }
}

/// One captured piece of work, replayed by [`CudaGraph::replay`]. The
/// tensors it read and wrote at capture are the ones every replay reads and
/// writes: inputs are changed in place between replays, never replaced.
pub struct CudaGraph {
    library: Library,
    capture: *mut c_void,
}

impl CudaGraph {
    /// Runs `work` `warmup` times on a side stream of `device` (so that
    /// cuDNN's autotuning and the allocator's first allocations happen
    /// outside the capture), then captures one more run of it. The shim is
    /// loaded from `library`.
    pub fn capture(
        library: &Path,
        device: Device,
        warmup: usize,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<Self> {
        let library = Library::open(library)?;
        let Device::Cuda(index) = device else {
            return Err(Error::Device(format!("a CUDA graph needs a CUDA device, not {device:?}")));
        };
        let mut capture = std::ptr::null_mut();
        // SAFETY: `new` writes a fresh handle, freed in Drop.
        library.check("allocation", unsafe { (library.new)(&mut capture) })?;
        let graph = Self { library, capture };
        let (library, capture) = (&graph.library, graph.capture);
        // SAFETY (all shim calls below): `capture` is live until `graph` drops.
        library.check("side stream", unsafe { (library.enter_side_stream)(capture, index as c_int) })?;
        let captured = (|| {
            for _ in 0..warmup {
                work()?;
            }
            library.check("capture", unsafe { (library.capture_begin)(capture) })?;
            let ran = work();
            // Ended even when the work failed, so the stream leaves capture mode.
            let ended = library.check("capture", unsafe { (library.capture_end)(capture) });
            ran.and(ended)
        })();
        let left = library.check("side stream", unsafe { (library.leave_side_stream)(capture) });
        captured.and(left)?;
        Ok(graph)
    }

    /// Queues the captured work on the current stream, as one launch.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `capture` is live while `self` is.
        self.library.check("replay", unsafe { (self.library.replay)(self.capture) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: made by the shim's `new`, freed once here.
        unsafe { (self.library.free)(self.capture) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named() {
        let path = Path::new("/nonexistent/libsimclr_graph.so");
        let error = CudaGraph::capture(path, Device::Cuda(0), 0, || Ok(())).err().expect("no library there");
        let message = error.to_string();
        assert!(
            message.contains("/nonexistent/libsimclr_graph.so") && message.contains("./x.sh build-cuda"),
            "{message}"
        );
    }

    #[test]
    fn a_library_without_the_shim_is_refused_by_name() {
        // The C library loads everywhere, and has none of the shim's functions.
        let error =
            CudaGraph::capture(Path::new("libc.so.6"), Device::Cuda(0), 0, || Ok(())).err().expect("not the shim");
        assert!(
            error.to_string().contains("libc.so.6: not a usable CUDA graph library (it has no simclr_graph_"),
            "{error}"
        );
    }
}
