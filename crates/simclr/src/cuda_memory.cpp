// A device's compute capability, peak memory of libtorch's CUDA caching
// allocator (what Python reads as torch.cuda.max_memory_allocated), and
// page-locked host tensors, which tch does not bind. Compiled by build.rs
// in the `cuda` build only; see device.rs for the Rust side. Every
// function catches every C++ exception and returns non-zero.
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>

extern "C" {

int simclr_cuda_capability(int device, int* major, int* minor) {
  try {
    const cudaDeviceProp* properties = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    *major = properties->major;
    *minor = properties->minor;
    return 0;
  } catch (...) {
    return 1;
  }
}

int simclr_cuda_peak_allocated(int device, int64_t* bytes) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *bytes = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    return 0;
  } catch (...) {
    return 1;
  }
}

int simclr_cuda_reset_peak(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 1;
  }
}

// `bytes` uninitialised bytes of page-locked host memory from libtorch's
// caching host allocator (what `torch.empty(..., pin_memory=True)` makes),
// as a new tensor owned by the caller (tch's `Tensor::from_ptr`).
int simclr_cuda_pinned_bytes(int64_t bytes, at::Tensor** out) {
  try {
    *out = new at::Tensor(at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
    return 0;
  } catch (...) {
    return 1;
  }
}
}
