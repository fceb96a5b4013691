//! What the binary adds around the library: signal handling and
//! process-wide settings.
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use simclr::train::Console;

/// The library's terminal observer, stopped by SIGINT or SIGTERM.
pub fn console() -> Result<Console> {
    Ok(Console::new(stop_flag()?)?)
}

/// A flag raised by SIGINT or SIGTERM.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing the signal handler")?;
    }
    Ok(stop)
}

/// Tunes glibc's malloc, which serves libtorch's CPU tensors, to keep freed
/// memory for reuse. By default it unmaps blocks over its (dynamic, at most
/// 32 MiB) mmap threshold and trims the heap top beyond twice that, so
/// every training step faults in and zeroes again the activations and
/// gradients the step before freed: on ResNet-18 at batch 64 on 2 cores,
/// 2.0-2.6M page faults and 4-5 s of system time per `simclr bench` run,
/// against 0.7-0.9M and 1.5-2 s with these settings, for 8-14% more peak
/// memory. A process-wide choice, so the binary makes it, not the library;
/// a user's own `GLIBC_TUNABLES` or `MALLOC_*_` settings win.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|name| std::env::var_os(name).is_some());
        if !user_set {
            // SAFETY: mallopt only sets allocator parameters; it is called
            // before any other thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}
