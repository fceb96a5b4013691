//! Device choice and mixed precision.
use tch::{Device, Tensor};

use crate::config::DeviceChoice;
use crate::{Error, Result};

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
            return Err(Error::InvalidArgument(
                "train.device = \"cuda\" but no CUDA device is available (is this a CUDA build, \
                 `--features cuda`, on a machine with a GPU?)"
                    .to_owned(),
            ))
        }
    };
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    Ok(device)
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

/// A slice of values as a 1-D tensor on `device`, through [`Pinned`].
pub fn upload_slice<T: tch::kind::Element>(values: &[T], device: Device) -> Tensor {
    Pinned::new(Tensor::from_slice(values), device).upload()
}

/// Runs `f` under bf16 autocast when `enabled` and `device` is CUDA; master
/// weights, BatchNorm statistics and the loss stay fp32 (autocast keeps
/// batch_norm and the loss's softmax in fp32).
pub fn autocast<T>(enabled: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !(enabled && device.is_cuda()) {
        return f();
    }
    use_bf16_on_cuda();
    tch::autocast(true, f)
}

/// tch's `autocast` enables CUDA autocast at libtorch's default dtype, fp16,
/// which would need loss scaling; bf16 has fp32's range and needs none.
/// tch 0.24 has no binding for the dtype, so this calls libtorch's own
/// `at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType)` by
/// its symbol. Both enums are `int8_t`-backed; CUDA = 1, BFloat16 = 15
/// (c10/core/DeviceType.h, c10/core/ScalarType.h in libtorch 2.11).
fn use_bf16_on_cuda() {
    extern "C" {
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        fn set_autocast_dtype(device_type: i8, dtype: i8);
    }
    const CUDA: i8 = 1;
    const BFLOAT16: i8 = 15;
    // SAFETY: a plain setter of a thread-local value taking two int8 enums.
    unsafe { set_autocast_dtype(CUDA, BFLOAT16) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn uploads_to_the_cpu_are_plain_copies() {
        // The page-locked, non-blocking path needs a GPU; on the CPU both
        // helpers must leave values, kind and shape alone.
        let host = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let uploaded = Pinned::new(host.shallow_clone(), Device::Cpu).upload();
        assert!(uploaded.equal(&host) && uploaded.kind() == Kind::Float && uploaded.size() == [3, 1]);
        assert!(upload_slice(&[4i64, 5], Device::Cpu).equal(&Tensor::from_slice(&[4i64, 5])));
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
}
