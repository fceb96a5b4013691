// Peak memory of libtorch's CUDA caching allocator (what Python reads as
// torch.cuda.max_memory_allocated), which tch does not bind. Compiled by
// build.rs in the `cuda` build only; see device.rs for the Rust side.
// Both functions catch every C++ exception and return non-zero.
#include <cstdint>

#include <c10/cuda/CUDACachingAllocator.h>

extern "C" {

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
}
