//! Device choice and mixed precision.
use tch::Device;

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

/// Whether a libtorch error message reports a failed allocation: the CPU
/// allocator's "can't allocate memory" or CUDA's "out of memory".
pub fn is_out_of_memory(message: &str) -> bool {
    message.contains("can't allocate memory") || message.contains("out of memory")
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
