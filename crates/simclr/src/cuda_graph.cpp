// libtorch's CUDA graphs for simclr (crates/simclr/src/cuda_graph.rs), which
// loads this library at run time: tch binds no part of at::cuda::CUDAGraph,
// and these headers need CUDA's, which a CPU build does not have.
// `./x.sh build-cuda` builds it beside the CUDA binary. Every
// function returns 0, or 1 with the reason in simclr_graph_last_error().
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <stdexcept>
#include <string>

namespace {

thread_local std::string last_error;

// One graph, and the streams its capture runs between.
struct Capture {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStream> side;
  std::optional<c10::cuda::CUDAStream> previous;
};

void check(cudaError_t status) {
  if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
}

// `waiting` runs nothing queued on it after this call until `on` has run
// everything queued on it before. (Raw events: ATen's CUDAEvent header pulls
// in cuBLAS's and CUDA's fp16 headers.)
void wait_for(const c10::cuda::CUDAStream& waiting, const c10::cuda::CUDAStream& on) {
  cudaEvent_t event;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  check(cudaEventRecord(event, on.stream()));
  check(cudaStreamWaitEvent(waiting.stream(), event, 0));
  check(cudaEventDestroy(event));
}

template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

Capture* of(void* capture) { return static_cast<Capture*>(capture); }

}  // namespace

extern "C" {

const char* simclr_graph_last_error() { return last_error.c_str(); }

int simclr_graph_new(void** capture) {
  return guarded([&] { *capture = new Capture(); });
}

void simclr_graph_free(void* capture) { delete of(capture); }

// Makes a stream from libtorch's pool the calling thread's current one on
// `device` (a capture cannot run on the default stream), after the work
// already queued on the previous one.
int simclr_graph_enter_side_stream(void* capture, int device) {
  return guarded([&] {
    auto previous = c10::cuda::getCurrentCUDAStream(device);
    auto side = c10::cuda::getStreamFromPool(false, device);
    wait_for(side, previous);
    c10::cuda::setCurrentCUDAStream(side);
    of(capture)->previous = previous;
    of(capture)->side = side;
  });
}

// Back to the previous stream, which waits for the side stream's work.
int simclr_graph_leave_side_stream(void* capture) {
  return guarded([&] {
    wait_for(*of(capture)->previous, *of(capture)->side);
    c10::cuda::setCurrentCUDAStream(*of(capture)->previous);
  });
}

// From here to capture_end, work queued on the current stream is recorded,
// not run; its memory comes from the graph's private pool.
int simclr_graph_capture_begin(void* capture) {
  return guarded([&] { of(capture)->graph.capture_begin(); });
}

int simclr_graph_capture_end(void* capture) {
  return guarded([&] { of(capture)->graph.capture_end(); });
}

// Queues the recorded work on the current stream, as one launch.
int simclr_graph_replay(void* capture) {
  return guarded([&] { of(capture)->graph.replay(); });
}

}  // extern "C"
