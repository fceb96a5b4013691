//! Device choice and mixed precision.
use tch::{Device, Kind, Tensor};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which device trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceChoice {
    /// CUDA when available, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            other => Err(Error::InvalidArgument(format!("unknown device '{other}': expected auto, cpu or cuda"))),
        }
    }
}

/// The device a run asks for, checked against what this build can reach.
///
/// On CUDA this also turns on cuDNN's benchmark mode, as the PyTorch
/// references in `tools/` do (`torch.backends.cudnn.benchmark = True`):
/// SimCLR's batches all have one shape, so the convolution algorithms timed
/// on the first steps serve the whole run.
pub fn select(choice: DeviceChoice) -> Result<Device> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Auto => Device::cuda_if_available(),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceChoice::Cuda => {
            return Err(Error::Device(
                "the device asked for is cuda (--device cuda, or train.device = \"cuda\"), but no CUDA device is \
                 available (is this a CUDA build, `--features cuda`, on a machine with a GPU?)"
                    .to_owned(),
            ))
        }
    };
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    Ok(device)
}

/// Makes cuDNN's convolutions deterministic on CUDA (`train.deterministic`):
/// deterministic algorithms only, and no autotuning, which times candidate
/// algorithms and may pick another one in another process. tch binds
/// neither switch of libtorch's global context but the benchmark one, so
/// the other is called by its symbol in libtorch_cpu, as autocast is below.
pub fn make_deterministic(device: Device) {
    if !device.is_cuda() {
        return;
    }
    tch::Cuda::cudnn_set_benchmark(false);
    // SAFETY: `at::globalContext()` returns the process's one `at::Context`,
    // never null; the setter is a member function taking it as its first
    // argument (the Itanium C++ ABI's `this`) and a bool.
    unsafe { context_ffi::set_deterministic_cudnn(context_ffi::global_context(), true) }
}

mod context_ffi {
    use std::ffi::c_void;

    extern "C" {
        #[link_name = "_ZN2at13globalContextEv"]
        pub fn global_context() -> *mut c_void;
        #[link_name = "_ZN2at7Context21setDeterministicCuDNNEb"]
        pub fn set_deterministic_cudnn(context: *mut c_void, enabled: bool);
        #[cfg(test)]
        #[link_name = "_ZNK2at7Context18deterministicCuDNNEv"]
        pub fn deterministic_cudnn(context: *const c_void) -> bool;
    }
}

/// The device of rank `rank` of a multi-process run asked to use `device`:
/// on CUDA, the rank's own GPU. torchrun numbers a machine's processes
/// consecutively, so rank modulo the GPUs of a machine is the local rank
/// (with fewer GPUs than processes, they share).
pub fn of_rank(device: Device, rank: usize) -> Device {
    match device {
        Device::Cuda(_) => Device::Cuda(rank % tch::Cuda::device_count().max(1) as usize),
        other => other,
    }
}

/// Stores every 4-D variable of `store` (the convolution kernels) in
/// channels-last order, NHWC in memory behind the same NCHW shape, as
/// `model.to(memory_format=torch.channels_last)` does; tch 0.24 has no
/// memory-format argument, so the copy is made into `empty_strided`.
///
/// Convolutions then run channels-last (oneDNN on the CPU, cuDNN on a GPU),
/// whatever the layout of their input. Measured on this project's 2-core CPU,
/// ResNet-18 at 32 px in PyTorch 2.11: a training step 1.3x faster, the
/// forward pass 1.3x.
pub fn use_channels_last(store: &tch::nn::VarStore) {
    for (_, variable) in store.variables() {
        if variable.dim() == 4 {
            tch::no_grad(|| variable.shallow_clone().set_data(&channels_last(&variable)));
        }
    }
}

/// A channels-last copy of a 4-D tensor `[N, C, H, W]`.
pub fn channels_last(x: &Tensor) -> Tensor {
    let size = x.size();
    let [_, c, h, w] = size[..] else { panic!("channels_last needs a 4-D tensor, got {size:?}") };
    let mut copy = Tensor::empty_strided(&size, [c * h * w, 1, w * c, c], (x.kind(), x.device()));
    tch::no_grad(|| copy.copy_(x));
    copy
}

/// An NCHW copy of a 4-D tensor `[N, C, H, W]`, through which gradients
/// flow. `contiguous()` is not enough for a channels-last 1x1 kernel: its
/// strides count as contiguous (the 1-sized dimensions are skipped), so it
/// comes back as it is, and libtorch still reads it as channels-last.
pub fn nchw(x: &Tensor) -> Tensor {
    let size = x.size();
    let [_, c, h, w] = size[..] else { panic!("nchw needs a 4-D tensor, got {size:?}") };
    let mut copy = Tensor::empty_strided(&size, [c * h * w, h * w, w, 1], (x.kind(), x.device()));
    copy.copy_(x);
    copy
}

/// Whether a libtorch error message reports a failed allocation: the CPU
/// allocator's "can't allocate memory" or CUDA's "out of memory".
pub fn is_out_of_memory(message: &str) -> bool {
    message.contains("can't allocate memory") || message.contains("out of memory")
}

/// A host tensor made ready to go to `device` without waiting for it.
///
/// A plain copy from ordinary (pageable) host memory to a GPU makes libtorch
/// wait for every kernel queued before it (`cudaStreamSynchronize` after
/// the copy), so one such copy inside a training step leaves the host idle
/// until the previous step is done, and the GPU idle while the host then
/// queues the next kernels. The device augmentation uploads each batch's
/// drawn parameters (crop boxes, jitter factors, the rows an op applies to),
/// a dozen small copies per step. From page-locked memory the copy is queued
/// like a kernel (`non_blocking`), and libtorch's caching host allocator
/// keeps the page-locked block until the copy is done, so the host tensor
/// may be dropped at once.
///
/// Loaders make it on their producer threads, so the copy into page-locked
/// memory is off the training thread; [`Pinned::upload`] runs where the
/// tensor is used. The type is the proof of pinning: libtorch's
/// `is_pinned`/`pin_memory` with a device warn on every call (deprecated
/// argument), and tch has no form without one, so nothing asks.
pub struct Pinned {
    host: Tensor,
    device: Device,
}

impl Pinned {
    /// `host` copied into page-locked memory when bound for a GPU; for any
    /// other device, `host` as it is.
    pub fn new(host: Tensor, device: Device) -> Self {
        let host = match device {
            // `_pin_memory` is `pin_memory` without the deprecated-argument warning.
            Device::Cuda(_) => host.internal_pin_memory(device),
            _ => host,
        };
        Self { host, device }
    }

    /// The tensor on its device; on a GPU the copy is queued, not waited for.
    pub fn upload(self) -> Tensor {
        match self.device {
            Device::Cuda(_) => self.host.to_device_(self.device, self.host.kind(), true, false),
            device => self.host.to_device(device),
        }
    }
}

/// A host tensor that data workers fill in place, bound for `device`.
///
/// Made where a batch would otherwise be filled in a `Vec`, copied into a
/// new tensor (`Tensor::from_slice`) and, for a GPU, copied again into
/// page-locked memory ([`Pinned::new`]), all on the one producer thread
/// while the workers wait for the next batch. A batch of 256 images at
/// 224 px is 77 MB of 8-bit views (the hybrid path) or 308 MB of floats (the
/// CPU path); on the 2-core CPU machine, 2026-12-04, the copy into a new
/// tensor of the 77 MB took 52-67 ms (its fresh pages fault in as they are
/// written; the same copy into memory already touched, 15-16 ms). For a
/// GPU the tensor is page-locked from the start, from libtorch's caching
/// host allocator, whose blocks are reused once their uploads are done:
/// the workers write into memory already touched, and nothing is copied
/// before the upload.
pub struct Staged {
    host: Tensor,
    device: Device,
}

impl Staged {
    /// An uninitialised `shape` of `kind` in host memory, page-locked when
    /// bound for a GPU.
    pub fn new(shape: &[i64], kind: Kind, device: Device) -> Result<Self> {
        let host = match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => pinned_empty(shape, kind)?,
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Tensor::f_empty(shape, (kind, Device::Cpu))?.f_internal_pin_memory(device)?,
            _ => Tensor::f_empty(shape, (kind, Device::Cpu))?,
        };
        Ok(Self { host, device })
    }

    /// Every element, to be written: they start with whatever bytes the
    /// allocator left, so the caller writes each one before
    /// [`Staged::into_pinned`]. Bytes and floats only (every bit pattern is
    /// one of their values).
    pub fn as_mut_slice<T: tch::kind::Element>(&mut self) -> &mut [T] {
        assert_eq!(self.host.kind(), T::KIND, "a staged tensor is written as its own kind");
        assert!(matches!(T::KIND, Kind::Uint8 | Kind::Float), "staged tensors hold bytes or floats");
        let len = self.host.numel();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: the tensor is contiguous (made by `empty`), owns `len`
        // elements of `T` (checked above) that nothing else references, and
        // `&mut self` keeps it alive and unshared for the slice's lifetime.
        // Its bytes come from libtorch's allocator, unwritten: any pattern
        // is a valid u8 or f32, and the caller overwrites them all.
        unsafe { std::slice::from_raw_parts_mut(self.host.data_ptr().cast::<T>(), len) }
    }

    /// Ready to go to the device without waiting ([`Pinned::upload`]).
    pub fn into_pinned(self) -> Pinned {
        Pinned { host: self.host, device: self.device }
    }

    /// Only `rows` (along dim 0, written; the others need not be), copied
    /// out ready to go to the device.
    pub fn rows(self, rows: &[usize]) -> Pinned {
        let rows: Vec<i64> = rows.iter().map(|&row| row as i64).collect();
        Pinned::new(self.host.index_select(0, &Tensor::from_slice(&rows)), self.device)
    }
}

#[cfg(feature = "cuda")]
extern "C" {
    fn simclr_cuda_pinned_bytes(bytes: i64, out: *mut *mut std::ffi::c_void) -> std::ffi::c_int;
}

/// An uninitialised page-locked host tensor (tch binds no `pin_memory`
/// option of `empty`): the shim's bytes, viewed as `shape` of `kind`.
#[cfg(feature = "cuda")]
fn pinned_empty(shape: &[i64], kind: Kind) -> Result<Tensor> {
    let elements: i64 = shape.iter().product();
    let bytes = elements * kind.elt_size_in_bytes() as i64;
    let mut out = std::ptr::null_mut();
    // SAFETY: the shim writes a new `at::Tensor*` through `out` when it
    // returns 0, whose ownership `from_ptr` takes.
    let failed = unsafe { simclr_cuda_pinned_bytes(bytes, &mut out) };
    if failed != 0 || out.is_null() {
        return Err(Error::InvalidArgument(format!(
            "could not allocate {bytes} bytes of page-locked host memory for a batch: lower train.batch_size or data.image_size"
        )));
    }
    // SAFETY: see above.
    let raw = unsafe { Tensor::from_ptr(out.cast()) };
    Ok(raw.f_view_dtype(kind)?.f_view(shape)?)
}

/// A slice of values as a 1-D tensor on `device`, through [`Pinned`].
pub fn upload_slice<T: tch::kind::Element>(values: &[T], device: Device) -> Tensor {
    Pinned::new(Tensor::from_slice(values), device).upload()
}

/// The arithmetic of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    /// bf16 autocast: convolutions and matrix products in bf16, from fp32
    /// master weights; BatchNorm statistics stay fp32. bf16 has fp32's
    /// range, so no loss scaling is needed, unlike fp16.
    Bf16,
    /// fp16 autocast, for GPUs with fp16 tensor cores but no bf16 (V100,
    /// T4: compute capability 7.x): as bf16, with the loss scaled up before
    /// the backward pass so that small gradients do not vanish in fp16's
    /// range, and scaled down before the update (PyTorch's `GradScaler`,
    /// see `optim::LossScale`).
    Fp16,
}

names!(Precision, "precision", { Fp32 => "fp32", Bf16 => "bf16", Fp16 => "fp16" });

/// Which half-precision type mixed precision takes (`train.mixed_precision_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HalfType {
    /// bf16 where the device computes it natively (CUDA compute capability
    /// 8.0 and up; CPUs with AVX-512 BF16), fp16 on GPUs of capability 7.x
    /// (V100, T4), fp32 elsewhere.
    #[default]
    Auto,
    /// bf16 where native, fp32 elsewhere.
    Bf16,
    /// fp16 on any device (on a CPU, emulated and slow: for tests).
    Fp16,
}

names!(HalfType, "half type", { Auto => "auto", Bf16 => "bf16", Fp16 => "fp16" });

/// What the device computes natively, for [`Precision::choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfSupport {
    pub bf16: bool,
    /// fp16 on tensor cores (a GPU of compute capability 7.0 or more).
    pub fp16: bool,
}

impl HalfSupport {
    /// On `device`: a CUDA device by its compute capability (bf16 from 8.0,
    /// as PyTorch's `torch.cuda.is_bf16_supported()` without emulation;
    /// fp16 tensor cores from 7.0), a CPU by its instructions.
    pub fn of(device: Device) -> Self {
        match device {
            Device::Cuda(index) => match cuda_capability(index) {
                Some((major, _)) => Self { bf16: major >= 8, fp16: major >= 7 },
                // Unknown (the shim failed): as before capabilities were read.
                None => Self { bf16: true, fp16: true },
            },
            Device::Cpu => Self { bf16: cpu_computes_bf16(), fp16: false },
            _ => Self { bf16: false, fp16: false },
        }
    }
}

impl Precision {
    /// What `train.mixed_precision` asks for on `device`: bf16 where it is
    /// native (GPUs of compute capability 8.0 and up, CPUs with
    /// [`cpu_computes_bf16`]), fp16 on GPUs of capability 7.x, fp32 on any
    /// other ([`HalfSupport::of`], [`Precision::choose`]). bf16 pays only
    /// where it is native: an AVX2 machine of this project's emulated it, a
    /// training step 11-12x slower than fp32; a 2-core Xeon with AMX trained
    /// 1.65-2.6x faster in it (docs/time-to-accuracy.md).
    pub fn on(device: Device, mixed_precision: bool) -> Self {
        Self::on_with(device, mixed_precision, HalfType::Auto)
    }

    /// [`Precision::on`] with the half type `half` asks for.
    pub fn on_with(device: Device, mixed_precision: bool, half: HalfType) -> Self {
        Self::choose(mixed_precision, half, HalfSupport::of(device))
    }

    /// The precision for `mixed_precision` and `half` on a device that
    /// computes what `native` says.
    pub fn choose(mixed_precision: bool, half: HalfType, native: HalfSupport) -> Self {
        match (mixed_precision, half) {
            (false, _) => Self::Fp32,
            (true, HalfType::Fp16) => Self::Fp16,
            (true, _) if native.bf16 => Self::Bf16,
            (true, HalfType::Auto) if native.fp16 => Self::Fp16,
            (true, _) => Self::Fp32,
        }
    }

    /// How a report names the precision after what it did: " in bf16" or
    /// " in fp16", nothing for fp32.
    pub fn in_words(self) -> String {
        match self {
            Self::Fp32 => String::new(),
            half => format!(" in {}", half.name()),
        }
    }

    /// Runs `f` in this precision, with autocast for `device`'s type.
    pub fn run<T>(self, device: Device, f: impl FnOnce() -> T) -> T {
        match self {
            Self::Fp32 => f(),
            Self::Bf16 | Self::Fp16 => {
                let _autocast = Autocast::new(device, self);
                f()
            }
        }
    }
}

/// `--precision` of the commands that run a trained network (`embed`,
/// `eval`, `neighbors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    /// The command's own: fp32 features; fine-tuning trains as pretraining
    /// does ([`Precision::on`] with mixed precision).
    #[default]
    Auto,
    Fp32,
    /// bf16 autocast where the device computes bf16 natively, fp32 (with a
    /// warning) where it would be emulated.
    Bf16,
    /// fp16 autocast (fine-tuning with loss scaling): for GPUs without
    /// bf16 (V100, T4); a CPU emulates it, slowly.
    Fp16,
}

names!(PrecisionChoice, "precision", { Auto => "auto", Fp32 => "fp32", Bf16 => "bf16", Fp16 => "fp16" });

impl PrecisionChoice {
    /// The precision on `device`: `auto` gives what training would
    /// ([`Precision::on`]) where `mixed_by_default` (fine-tuning), fp32
    /// otherwise.
    pub fn on(self, device: Device, mixed_by_default: bool) -> Precision {
        match self {
            Self::Auto => Precision::on(device, mixed_by_default),
            Self::Fp32 => Precision::Fp32,
            Self::Fp16 => Precision::Fp16,
            Self::Bf16 => {
                let precision = Precision::on_with(device, true, HalfType::Bf16);
                if precision == Precision::Fp32 {
                    tracing::warn!(
                        "--precision bf16: {device:?} does not compute bf16 natively (a CPU without AVX-512 BF16, \
                         a GPU before compute capability 8.0), where it would be emulated many times slower; \
                         computing in fp32"
                    );
                }
                precision
            }
        }
    }
}

/// Whether this CPU has bf16 instructions (AVX-512 BF16, which every x86
/// CPU with AMX also has), the test PyTorch's own
/// `torch.cpu._is_avx512_bf16_supported()` makes. oneDNN then runs bf16
/// convolutions and matrix products natively, and emulates them without.
/// Other architectures are not measured and keep fp32.
pub fn cpu_computes_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// libtorch's autocast state for one device type, switched to bf16 (or
/// fp16) while this lives and restored when it drops (even in unwinding), as Python's
/// `torch.autocast` context does.
///
/// Not `tch::autocast`: it calls libtorch's deprecated CUDA-only
/// `at::autocast::is_enabled`/`set_enabled`, which print a deprecation
/// warning on every call (three lines per region, checked with a C++
/// program against libtorch 2.11's headers), and it enables fp16, not
/// bf16. tch 0.24 binds none of the per-device functions, so they are
/// called here by their symbols in libtorch_cpu. `c10::DeviceType` and
/// `c10::ScalarType` are both `int8_t`-backed (c10/core/DeviceType.h,
/// c10/core/ScalarType.h).
struct Autocast {
    device_type: i8,
    was_enabled: bool,
    was_dtype: i8,
}

mod autocast_ffi {
    extern "C" {
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device_type: i8) -> bool;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device_type: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device_type: i8) -> i8;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
    pub const CPU: i8 = 0;
    pub const CUDA: i8 = 1;
    pub const BFLOAT16: i8 = 15;
    pub const HALF: i8 = 5;

    /// The `c10::DeviceType` whose autocast state governs `device`.
    pub fn device_type(device: tch::Device) -> i8 {
        if device.is_cuda() {
            CUDA
        } else {
            CPU
        }
    }
}

impl Autocast {
    /// Autocast to `precision`'s half type (bf16 or fp16).
    fn new(device: Device, precision: Precision) -> Self {
        use autocast_ffi::*;
        let device_type = device_type(device);
        let dtype = if precision == Precision::Fp16 { HALF } else { BFLOAT16 };
        // SAFETY: plain getters and setters of libtorch's thread-local
        // autocast state, taking and returning int8 enums, bools and ints.
        unsafe {
            let state = Self {
                device_type,
                was_enabled: is_autocast_enabled(device_type),
                was_dtype: get_autocast_dtype(device_type),
            };
            set_autocast_enabled(device_type, true);
            set_autocast_dtype(device_type, dtype);
            increment_nesting();
            state
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        use autocast_ffi::*;
        // SAFETY: as in `Autocast::new`.
        unsafe {
            // The outermost region frees the half copies of the weights it cached.
            if decrement_nesting() == 0 {
                clear_cache();
            }
            set_autocast_enabled(self.device_type, self.was_enabled);
            set_autocast_dtype(self.device_type, self.was_dtype);
        }
    }
}

/// The most memory a stretch of work held, from [`PeakMemory::start`] to
/// [`PeakMemory::read`]: on CUDA the bytes libtorch's caching allocator
/// handed out (Python's `torch.cuda.max_memory_allocated`); on the CPU the
/// process's peak resident set (`VmHWM`), which also counts libtorch's code
/// and everything else the process holds.
#[derive(Debug, Clone, Copy)]
pub struct PeakMemory {
    device: Device,
}

/// What [`PeakMemory::read`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryKind {
    /// Bytes allocated on a CUDA device.
    CudaAllocated,
    /// The process's resident set in host memory.
    HostResident,
}

impl MemoryKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::CudaAllocated => "CUDA memory allocated",
            Self::HostResident => "resident set",
        }
    }
}

/// CUDA device `index`'s compute capability (major, minor); `None` where
/// it cannot be read (a build without CUDA).
pub fn cuda_capability(index: usize) -> Option<(i32, i32)> {
    #[cfg(feature = "cuda")]
    {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: a plain call into the shim, which catches every
        // exception and writes both numbers when it returns 0.
        let failed = unsafe { simclr_cuda_capability(index as std::ffi::c_int, &mut major, &mut minor) };
        (failed == 0).then_some((major, minor))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = index;
        None
    }
}

#[cfg(feature = "cuda")]
extern "C" {
    fn simclr_cuda_capability(
        device: std::ffi::c_int,
        major: *mut std::ffi::c_int,
        minor: *mut std::ffi::c_int,
    ) -> std::ffi::c_int;
    fn simclr_cuda_peak_allocated(device: std::ffi::c_int, bytes: *mut i64) -> std::ffi::c_int;
    fn simclr_cuda_reset_peak(device: std::ffi::c_int) -> std::ffi::c_int;
}

impl PeakMemory {
    /// Starts measuring from what `device`'s memory holds now.
    pub fn start(device: Device) -> Self {
        match device {
            #[cfg(feature = "cuda")]
            // SAFETY: a plain call into the shim, which catches every exception.
            Device::Cuda(index) => unsafe {
                simclr_cuda_reset_peak(index as std::ffi::c_int);
            },
            // "5" resets the peak resident set to the current one (proc(5)).
            _ => {
                let _ = std::fs::write("/proc/self/clear_refs", "5");
            }
        }
        Self { device }
    }

    /// The peak since [`PeakMemory::start`], in bytes; `None` where this
    /// build or system cannot tell.
    pub fn read(&self) -> Option<(u64, MemoryKind)> {
        match self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(index) => {
                let mut bytes = 0i64;
                // SAFETY: the shim writes one integer through a valid pointer.
                let failed = unsafe { simclr_cuda_peak_allocated(index as std::ffi::c_int, &mut bytes) };
                (failed == 0).then_some((bytes as u64, MemoryKind::CudaAllocated))
            }
            Device::Cpu => {
                let status = std::fs::read_to_string("/proc/self/status").ok()?;
                let line = status.lines().find_map(|line| line.strip_prefix("VmHWM:"))?;
                let kilobytes: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
                Some((kilobytes * 1024, MemoryKind::HostResident))
            }
            _ => None,
        }
    }
}

/// An allocation failure inside a training step surfaces as a panic in tch;
/// the library turns it into an error naming the batch size, so the panic
/// message itself is not printed; so does a failed collective in a
/// multi-process run ([`crate::dist::CollectiveFailed`]). A process-wide setting: the binary
/// calls it at start.
pub fn quiet_out_of_memory_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        // A collective that failed in a forward pass becomes an error too.
        let collective = payload.is::<crate::dist::CollectiveFailed>();
        if !message.is_some_and(is_out_of_memory) && !collective {
            default_hook(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn the_cudnn_determinism_switch_reaches_libtorchs_context() {
        // What make_deterministic sets on CUDA, set and read back here: the
        // symbols resolve, and the setter writes what the getter reads.
        // SAFETY: as in make_deterministic; the setting is put back.
        unsafe {
            let context = context_ffi::global_context();
            let before = context_ffi::deterministic_cudnn(context);
            context_ffi::set_deterministic_cudnn(context, !before);
            assert_eq!(context_ffi::deterministic_cudnn(context), !before);
            context_ffi::set_deterministic_cudnn(context, before);
            assert_eq!(context_ffi::deterministic_cudnn(context), before);
        }
    }

    #[test]
    fn uploads_to_the_cpu_are_plain_copies() {
        // The page-locked, non-blocking path needs a GPU; on the CPU both
        // helpers must leave values, kind and shape alone.
        let host = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let uploaded = Pinned::new(host.shallow_clone(), Device::Cpu).upload();
        assert!(uploaded.equal(&host) && uploaded.kind() == Kind::Float && uploaded.size() == [3, 1]);
        assert!(upload_slice(&[4i64, 5], Device::Cpu).equal(&Tensor::from_slice(&[4i64, 5])));
    }

    fn autocast_state(device_type: i8) -> (bool, i8) {
        // SAFETY: as in `Autocast::bf16`.
        unsafe { (autocast_ffi::is_autocast_enabled(device_type), autocast_ffi::get_autocast_dtype(device_type)) }
    }

    #[test]
    fn bf16_casts_products_and_restores_the_state_it_found() {
        // The CPU's autocast runs the same dispatch as CUDA's, so the casts
        // are checked here; CUDA's state is a thread-local switch like it.
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        for device in [Device::Cpu, Device::Cuda(0)] {
            let device_type = autocast_ffi::device_type(device);
            let before = autocast_state(device_type);
            assert!(!before.0);
            let (outer, inner, after_inner) = Precision::Bf16.run(device, || {
                let outer = x.linear(&w, None::<Tensor>).kind();
                let inner = Precision::Bf16.run(device, || autocast_state(device_type));
                (outer, inner, autocast_state(device_type))
            });
            assert_eq!(inner, (true, autocast_ffi::BFLOAT16));
            // A nested region leaves the outer one on.
            assert_eq!(after_inner, (true, autocast_ffi::BFLOAT16));
            assert_eq!(autocast_state(device_type), before);
            // CUDA's autocast leaves CPU tensors alone.
            let expected = if device.is_cuda() { Kind::Float } else { Kind::BFloat16 };
            assert_eq!(outer, expected, "{device:?}");
        }
        assert_eq!(Precision::Fp32.run(Device::Cpu, || x.linear(&w, None::<Tensor>).kind()), Kind::Float);
        assert_eq!(Precision::on(Device::Cuda(0), true), Precision::Bf16);
        assert_eq!(Precision::on(Device::Cuda(0), false), Precision::Fp32);
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn the_cpu_trains_in_bf16_where_it_has_bf16_instructions() {
        // The kernel's list of the CPU's features, read apart from std's
        // CPUID detection that `cpu_computes_bf16` uses.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags = cpuinfo.lines().find(|line| line.starts_with("flags")).unwrap();
        let native = flags.split_whitespace().any(|flag| flag == "avx512_bf16");
        assert_eq!(cpu_computes_bf16(), native, "{flags}");
        let expected = if native { Precision::Bf16 } else { Precision::Fp32 };
        assert_eq!(Precision::on(Device::Cpu, true), expected);
        assert_eq!(Precision::on(Device::Cpu, false), Precision::Fp32);
        // --precision: auto follows the command's default, bf16 the CPU.
        assert_eq!(PrecisionChoice::Auto.on(Device::Cpu, true), expected);
        assert_eq!(PrecisionChoice::Auto.on(Device::Cpu, false), Precision::Fp32);
        assert_eq!(PrecisionChoice::Fp32.on(Device::Cpu, true), Precision::Fp32);
        assert_eq!(PrecisionChoice::Bf16.on(Device::Cpu, false), expected);
    }

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let y = channels_last(&x);
        assert_eq!(y.size(), x.size());
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(y.equal(&x));
        let store = tch::nn::VarStore::new(Device::Cpu);
        let conv = tch::nn::conv2d(store.root() / "conv", 3, 8, 3, Default::default());
        let before = conv.ws.copy();
        let output = x.apply(&conv);
        use_channels_last(&store);
        assert_eq!(conv.ws.stride(), vec![27, 1, 9, 3]);
        assert!(conv.ws.equal(&before) && conv.ws.requires_grad());
        assert!((x.apply(&conv) - output).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn cuda_without_a_gpu_is_refused_naming_the_flag_and_the_field() {
        match tch::Cuda::is_available() {
            true => assert!(select(DeviceChoice::Cuda).unwrap().is_cuda()),
            false => {
                let error = select(DeviceChoice::Cuda).unwrap_err().to_string();
                assert!(error.contains("--device cuda") && error.contains("train.device = \"cuda\""), "{error}");
            }
        }
    }

    #[test]
    fn mixed_precision_takes_bf16_where_native_fp16_on_tensor_cores_without_it_and_fp32_elsewhere() {
        use HalfType::{Auto, Bf16, Fp16};
        let ampere = HalfSupport { bf16: true, fp16: true };
        let turing = HalfSupport { bf16: false, fp16: true };
        let pascal_or_avx2 = HalfSupport { bf16: false, fp16: false };
        let cases = [
            (true, Auto, ampere, Precision::Bf16),
            (true, Auto, turing, Precision::Fp16),
            (true, Auto, pascal_or_avx2, Precision::Fp32),
            (true, Bf16, turing, Precision::Fp32),
            (true, Bf16, ampere, Precision::Bf16),
            (true, Fp16, ampere, Precision::Fp16),
            (true, Fp16, pascal_or_avx2, Precision::Fp16),
            (false, Fp16, turing, Precision::Fp32),
            (false, Auto, ampere, Precision::Fp32),
        ];
        for (mixed, half, native, expected) in cases {
            assert_eq!(Precision::choose(mixed, half, native), expected, "{mixed} {half:?} {native:?}");
        }
        // A CPU never takes fp16 by itself.
        assert_ne!(Precision::on(Device::Cpu, true), Precision::Fp16);
        assert_eq!(PrecisionChoice::Fp16.on(Device::Cpu, false), Precision::Fp16);
    }
}
