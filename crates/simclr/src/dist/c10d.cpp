// A C ABI over libtorch's c10d: a process group (a TCPStore or FileStore,
// Gloo for CPU tensors, NCCL for CUDA tensors in the `cuda` build), its
// collectives, and two differentiable ones (all-reduce, all-gather) as
// autograd functions. Compiled by build.rs against the torch wheel's headers;
// see src/dist/mod.rs for the Rust side.
//
// Every exported function catches every C++ exception and returns non-zero;
// the message is kept per thread for simclr_dist_last_error().
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SIMCLR_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "../guarded.h"

namespace {

using simclr::guarded;
using simclr::last_error;

// c10d's flight recorder, one per process, records every collective as it
// is enqueued, and in torch 2.11 inserts a group into its map of groups
// before taking its own lock (pytorch/pytorch PR 179449): two groups of one
// process enqueueing at once can corrupt the map and crash the process.
// One group per process never races, but several ranks in one process do
// (the tests' threads), so every collective is enqueued under this lock,
// released before its wait. (NCCL's first collective sets up its
// communicator while enqueued, waiting for the other ranks: ranks as threads
// of one process would wait for each other here. Runs have a process per
// GPU, and the tests' threads use Gloo, whose enqueue never waits.)
std::mutex enqueue_mutex;

template <class Enqueue>
c10::intrusive_ptr<c10d::Work> enqueued(Enqueue&& enqueue) {
  std::lock_guard<std::mutex> guard(enqueue_mutex);
  return enqueue();
}

// Waits for a collective. NCCL's wait given a timeout blocks the calling
// thread until the collective has run on the GPU, polling every millisecond
// (ProcessGroupNCCL's WorkNCCL::wait): the host then stalls behind every
// kernel queued before it, at each global BatchNorm layer, each loss
// all-reduce and each step's gradient, and the GPU idles while the host
// queues the next kernels (on the H200, 2026-12-04, one NCCL process trained
// 23.5% slower than the plain run that way). Without a timeout the wait only
// makes the current stream wait for NCCL's, as DDP's does, and a collective
// that never completes is NCCL's watchdog's to stop, after the backend's
// timeout (its options'), taking the process down with the collective named.
// Gloo runs on the host (CUDA tensors staged through it): its wait keeps
// the timeout.
void await(const c10::intrusive_ptr<c10d::Work>& work, bool stream_ordered, std::chrono::milliseconds timeout) {
  if (stream_ordered) {
    work->wait();
  } else {
    work->wait(timeout);
  }
}

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  // Each backend once, for shutdown.
  std::vector<c10::intrusive_ptr<c10d::Backend>> backends;
  std::chrono::milliseconds timeout;
  int rank;
  int size;
  // How the backends were made, for another set of them.
  c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> gloo_options;
  bool nccl;

  c10::intrusive_ptr<c10d::Backend> backend(const at::Tensor& tensor) const {
    return group->getBackend(tensor.device().type());
  }

  // A backend of its own for `tensor`'s device, made as the group's was,
  // with connections (Gloo) or a communicator and stream (NCCL) of its own,
  // so that its collectives do not queue with the group's. Every rank must
  // make it at the same point.
  c10::intrusive_ptr<c10d::Backend> separate_backend(const std::string& name, const at::Tensor& tensor) const {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name, store);
#ifdef SIMCLR_NCCL
    if (nccl && tensor.is_cuda()) {
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      return c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
    }
#endif
    return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, gloo_options);
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const at::Tensor& tensor) const {
    await(work, nccl && tensor.is_cuda(), timeout);
  }

  void all_reduce(at::Tensor& tensor, c10d::ReduceOp::RedOpType op) const {
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp(op);
    options.timeout = timeout;
    wait(enqueued([&] { return backend(tensor)->allreduce(tensors, options); }), tensor);
  }

  void broadcast(at::Tensor& tensor, int root) const {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = timeout;
    wait(enqueued([&] { return backend(tensor)->broadcast(tensors, options); }), tensor);
  }

  // `output` holds the `size` inputs one after another along dim 0.
  void all_gather(at::Tensor& output, at::Tensor& input) const {
    c10d::AllgatherOptions options;
    options.timeout = timeout;
    wait(enqueued([&] { return backend(input)->_allgather_base(output, input, options); }), input);
  }

  // `input` holds `size` blocks along dim 0; this rank gets the sum of
  // every rank's block `rank`.
  void reduce_scatter(at::Tensor& output, at::Tensor& input) const {
    c10d::ReduceScatterOptions options;
    options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    options.timeout = timeout;
    wait(enqueued([&] { return backend(input)->_reduce_scatter_base(output, input, options); }), input);
  }
};

Group* group_of(const torch::autograd::AutogradContext* context) {
  return reinterpret_cast<Group*>(context->saved_data.at("group").toInt());
}

// y = sum over ranks of x. Every rank's loss depends on y, so the gradient
// reaching x is the sum over ranks of dL_r/dy: an all-reduce again.
struct AllReduceSum : public torch::autograd::Function<AllReduceSum> {
  static at::Tensor forward(torch::autograd::AutogradContext* context, const at::Tensor& input, int64_t group) {
    context->saved_data["group"] = group;
    at::Tensor output = input.contiguous().clone();
    reinterpret_cast<Group*>(group)->all_reduce(output, c10d::ReduceOp::SUM);
    return output;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* context,
      torch::autograd::variable_list grads) {
    at::Tensor grad = grads[0].contiguous().clone();
    group_of(context)->all_reduce(grad, c10d::ReduceOp::SUM);
    return {grad, at::Tensor()};
  }
};

// y = the inputs of every rank, one after another along dim 0. Rank r's
// rows of y feed every rank's loss, so the gradient reaching x is the sum
// over ranks of their gradient's block r: a sum reduce-scatter. Keeping only
// this rank's own block is the known bug (solo-learn PR #232, lightly PR #1531).
struct AllGather : public torch::autograd::Function<AllGather> {
  static at::Tensor forward(torch::autograd::AutogradContext* context, const at::Tensor& input, int64_t group) {
    context->saved_data["group"] = group;
    Group* g = reinterpret_cast<Group*>(group);
    at::Tensor local = input.contiguous();
    std::vector<int64_t> shape = local.sizes().vec();
    shape[0] *= g->size;
    at::Tensor output = at::empty(shape, local.options());
    g->all_gather(output, local);
    return output;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* context,
      torch::autograd::variable_list grads) {
    Group* g = group_of(context);
    at::Tensor grad = grads[0].contiguous();
    std::vector<int64_t> shape = grad.sizes().vec();
    shape[0] /= g->size;
    at::Tensor output = at::empty(shape, grad.options());
    g->reduce_scatter(output, grad);
    return {output, at::Tensor()};
  }
};

// BatchNorm's input gradient on the CPU, dx = k1 dy + k2 x + k3 with
// per-channel k (in the statistics' type, `acc_t`), in one pass over the
// activations, computed in `acc_t` and written in the input's type, as
// libtorch's own CPU kernel does. Composed of tensor ops (two addcmul in
// fp32, then the cast back to bf16: three passes of fp32 width), it made
// the demo preset (ResNet-18 0.25x, bf16) on the 2-core CPU train at
// 478-497 images/s through the global path forced at world size 1, against
// 568-585 with this kernel and 620-629 with plain BatchNorm; with
// --nproc-per-node 2, 521-539 against 545-577 (per-process BN 747-758).
// at::parallel_for is OpenMP here, hence the shim's -fopenmp (build.rs).
template <typename scalar_t, typename acc_t>
void input_gradient_cpu(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& k1,
    const at::Tensor& k2,
    const at::Tensor& k3,
    at::Tensor& out,
    bool channels_last) {
  const int64_t channels = input.size(1);
  const int64_t inner = channels_last ? 1 : input.numel() / std::max<int64_t>(input.size(0) * channels, 1);
  const scalar_t* dy = grad.const_data_ptr<scalar_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* dx = out.mutable_data_ptr<scalar_t>();
  const acc_t* a = k1.const_data_ptr<acc_t>();
  const acc_t* b = k2.const_data_ptr<acc_t>();
  const acc_t* d = k3.const_data_ptr<acc_t>();
  // Channels last: rows of `channels` values; else planes of `inner`.
  const int64_t run = channels_last ? channels : inner;
  const int64_t runs = input.numel() / std::max<int64_t>(run, 1);
  at::parallel_for(0, runs, 1 + 32768 / std::max<int64_t>(run, 1), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * run;
      if (channels_last) {
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t value = a[c] * static_cast<acc_t>(dy[offset + c]) + b[c] * static_cast<acc_t>(x[offset + c]) + d[c];
          dx[offset + c] = static_cast<scalar_t>(value);
        }
      } else {
        const int64_t c = r % channels;
        const acc_t ka = a[c], kb = b[c], kd = d[c];
        for (int64_t j = 0; j < inner; ++j) {
          const acc_t value = ka * static_cast<acc_t>(dy[offset + j]) + kb * static_cast<acc_t>(x[offset + j]) + kd;
          dx[offset + j] = static_cast<scalar_t>(value);
        }
      }
    }
  });
}

// `input_gradient_cpu` where it applies: a CPU input of fp32, fp64 or bf16,
// contiguous or channels-last, and `grad` laid out as it; else undefined
// (the tensor ops then compute it, as on a GPU).
at::Tensor fused_input_gradient(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& k1,
    const at::Tensor& k2,
    const at::Tensor& k3) {
  if (!input.device().is_cpu() || input.dim() < 2) {
    return {};
  }
  const bool contiguous = input.is_contiguous() && grad.is_contiguous();
  const bool channels_last = !contiguous && input.dim() == 4 &&
      input.is_contiguous(at::MemoryFormat::ChannelsLast) && grad.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!contiguous && !channels_last) {
    return {};
  }
  at::Tensor out = at::empty_like(input);
  const auto type = input.scalar_type();
  if (type == at::kFloat && k1.scalar_type() == at::kFloat) {
    input_gradient_cpu<float, float>(grad, input, k1, k2, k3, out, channels_last);
  } else if (type == at::kDouble && k1.scalar_type() == at::kDouble) {
    input_gradient_cpu<double, double>(grad, input, k1, k2, k3, out, channels_last);
  } else if (type == at::kBFloat16 && k1.scalar_type() == at::kFloat) {
    input_gradient_cpu<c10::BFloat16, float>(grad, input, k1, k2, k3, out, channels_last);
  } else {
    return {};
  }
  return out;
}

// Global BatchNorm in training (SyncBN): y = w (x - mean) invstd + b with
// the mean and biased variance of every rank's slice together. Forward: each
// rank's per-channel mean and sum of squared deviations (libtorch's
// statistics kernel), one all-gather, Chan et al.'s parallel-variance merge,
// then libtorch's fused normalisation given those statistics (the ranks'
// slices may differ in size: `images` names each rank's, where a fine-tuning
// batch may not split evenly, and the statistics are weighted by them where
// they differ; empty, all are this rank's); the running
// statistics move with the global mean and unbiased variance. Backward: the
// per-channel sums of dy and dy x_hat (libtorch's backward reduction kernel
// with the global statistics), one sum all-reduce of them, and
//   dx = w invstd (dy - sum(dy)/M - x_hat sum(dy x_hat)/M)   (M: global count)
// in one pass on the CPU (input_gradient_cpu above), as two fused
// multiply-adds elsewhere; w and b get this rank's sums, as any parameter
// does before the gradient all-reduce. This is the backward of
// torch.nn.SyncBatchNorm, whose kernels are CUDA's alone; ordinary tensor ops
// through autograd, a pass over the activations each, were much slower
// (docs/distributed.md).
struct GlobalBatchNorm : public torch::autograd::Function<GlobalBatchNorm> {
  static at::Tensor forward(
      torch::autograd::AutogradContext* context,
      const at::Tensor& input,
      const at::Tensor& weight,
      const at::Tensor& bias,
      const at::Tensor& running_mean,
      const at::Tensor& running_var,
      double momentum,
      double eps,
      int64_t group,
      const std::vector<int64_t>& images) {
    Group* g = reinterpret_cast<Group*>(group);
    const int64_t channels = input.size(1);
    // Statistics in fp32 at least (fp64 stays fp64): passed running
    // statistics of that type make the kernel accumulate and return in it
    // for bf16 input; momentum 0 leaves them as they are.
    const auto stat_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto stat_options = input.options().dtype(stat_type);
    auto [local_mean, local_var] = at::batch_norm_update_stats(
        input, at::zeros({channels}, stat_options), at::ones({channels}, stat_options), 0.0);
    const double count = static_cast<double>(input.numel() / channels);
    at::Tensor local = at::cat({local_mean, local_var * count});
    at::Tensor all = at::empty({g->size * 2 * channels}, local.options());
    g->all_gather(all, local);
    all = all.view({g->size, 2 * channels});
    at::Tensor means = all.narrow(1, 0, channels);
    at::Tensor m2 = all.narrow(1, channels, channels).sum(0);
    double total = count * g->size;
    at::Tensor mean;
    const bool even = std::all_of(images.begin(), images.end(), [&](int64_t n) { return n == images.front(); });
    if (even) {
      mean = means.mean(0);
      m2 = m2 + (means - mean).square().sum(0) * count;
    } else {
      // Each rank's statistics weighted by its count (its images times
      // this layer's positions per image).
      const double positions = count / static_cast<double>(input.size(0));
      std::vector<double> counts;
      for (int64_t n : images) {
        counts.push_back(static_cast<double>(n) * positions);
      }
      total = std::accumulate(counts.begin(), counts.end(), 0.0);
      at::Tensor weights = at::tensor(counts, at::dtype(at::kDouble)).to(stat_options).unsqueeze(1);
      mean = (means * weights).sum(0) / total;
      m2 = m2 + ((means - mean).square() * weights).sum(0);
    }
    at::Tensor variance = m2 / total;
    at::Tensor output = std::get<0>(at::native_batch_norm(input, weight, bias, mean, variance, false, 0.0, eps));
    {
      at::NoGradGuard no_grad;
      const double unbiased = total / std::max(total - 1.0, 1.0);
      running_mean.mul_(1.0 - momentum).add_((mean * momentum).to(running_mean.scalar_type()));
      running_var.mul_(1.0 - momentum).add_((variance * (unbiased * momentum)).to(running_var.scalar_type()));
    }
    context->save_for_backward({input, weight, mean, (variance + eps).rsqrt()});
    context->saved_data["group"] = group;
    context->saved_data["total"] = total;
    context->saved_data["eps"] = eps;
    context->saved_data["bias"] = bias.defined();
    return output;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* context,
      torch::autograd::variable_list grads) {
    Group* g = group_of(context);
    const auto saved = context->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    const int64_t channels = input.size(1);
    const double total = context->saved_data.at("total").toDouble();
    at::Tensor grad = grads[0].contiguous(input.suggest_memory_format());
    at::Tensor scale = weight.defined() ? weight : at::ones({channels}, mean.options());
    // This rank's sums of dy x_hat and of dy (the kernel's weight and bias
    // gradients, which do not depend on the weight's value).
    auto [unused, local_dy_xhat, local_dy] = at::native_batch_norm_backward(
        grad, input, scale, {}, {}, mean, invstd, true, context->saved_data.at("eps").toDouble(), {false, true, true});
    at::Tensor sums = at::cat({local_dy.to(mean.scalar_type()), local_dy_xhat.to(mean.scalar_type())});
    g->all_reduce(sums, c10d::ReduceOp::SUM);
    at::Tensor mean_dy = sums.narrow(0, 0, channels) / total;
    at::Tensor mean_dy_xhat = sums.narrow(0, channels, channels) / total;
    // dx = k1 dy + k2 x + k3 per channel.
    at::Tensor k1 = scale.to(mean.scalar_type()) * invstd;
    at::Tensor k2 = -k1 * invstd * mean_dy_xhat;
    at::Tensor k3 = -k1 * mean_dy - k2 * mean;
    at::Tensor grad_input = fused_input_gradient(grad, input, k1.contiguous(), k2.contiguous(), k3.contiguous());
    if (!grad_input.defined()) {
      std::vector<int64_t> shape(input.dim(), 1);
      shape[1] = channels;
      grad_input = at::addcmul(k3.view(shape), input, k2.view(shape));
      grad_input.addcmul_(grad, k1.view(shape));
      grad_input = grad_input.to(input.scalar_type());
    }
    return {
        grad_input,
        weight.defined() ? local_dy_xhat : at::Tensor(),
        context->saved_data.at("bias").toBool() ? local_dy : at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor(),
        at::Tensor()};
  }
};

// The gradient all-reduce in buckets, overlapped with the backward pass as
// DDP's reducer does it: a hook on each parameter copies its gradient into
// its place in the flat buffer as soon as autograd has computed it, and a
// bucket (a contiguous range of the buffer, about `cap` bytes) is
// all-reduced without waiting once all its parameters have arrived, while
// the backward goes on through the layers below. Buckets go in one fixed
// order, the buffer's last range first (the backward reaches the last
// layers first) and each only after the ones before it, so every rank
// enqueues the same collectives in the same order whatever order its hooks
// fire in. They go through a backend of their own: on the group's, the
// backward's own small collectives (global BatchNorm's sums, the gather's
// reduce-scatter), which it waits for, queued behind the buckets in flight.
// A pass not marked `last` (gradient caching's earlier chunks) only
// accumulates. Parameters the loss does not reach get zeros, and their
// buckets go at `finish`, which then waits for every bucket and divides by
// the number of ranks. With `bf16`, each bucket travels as a bf16 copy,
// summed in bf16 and copied back at `finish` (DDP's bf16_compress_hook).
struct Buckets {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // NCCL's collectives (see `await`).
  bool stream_ordered;
  int size;
  bool bf16;
  at::Tensor flat;
  std::vector<at::Tensor> params;
  // Each parameter's place in `flat`, shaped as the parameter permuted to
  // its memory order (the optimiser's flat layout), and that order.
  std::vector<at::Tensor> slots;
  std::vector<std::vector<int64_t>> orders;
  std::vector<unsigned> hooks;
  // In launch order: the range of `flat` and the parameters it holds.
  std::vector<at::Tensor> ranges;
  std::vector<std::vector<size_t>> members;
  std::vector<size_t> bucket_of;
  std::mutex mutex;
  bool armed = false;
  bool last = false;
  std::vector<char> written;  // in this step
  // Per bucket, its parameters yet to arrive in this pass.
  std::vector<size_t> pending;
  // The buckets sent in this step, in launch order (so the next to send is
  // bucket `sent.size()`): each all-reduce and what it reduces (the range
  // itself, or its bf16 copy).
  std::vector<std::pair<c10::intrusive_ptr<c10d::Work>, at::Tensor>> sent;

  Buckets(
      Group* group,
      std::vector<at::Tensor> params_,
      std::vector<std::vector<int64_t>> orders_,
      at::Tensor flat_,
      int64_t cap,
      bool bf16_)
      : backend(group->separate_backend("buckets", flat_)),
        timeout(group->timeout),
        stream_ordered(group->nccl && flat_.is_cuda()),
        size(group->size),
        bf16(bf16_),
        flat(std::move(flat_)),
        params(std::move(params_)),
        orders(std::move(orders_)) {
    if (params.size() != orders.size() || !flat.is_contiguous() || flat.dim() != 1) {
      throw std::invalid_argument("buckets: a flat contiguous buffer and an order per parameter");
    }
    std::vector<int64_t> offsets;
    int64_t offset = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      std::vector<int64_t> permuted;
      for (int64_t d : orders[i]) {
        permuted.push_back(params[i].size(d));
      }
      offsets.push_back(offset);
      slots.push_back(flat.narrow(0, offset, params[i].numel()).view(permuted));
      offset += params[i].numel();
    }
    if (offset != flat.numel()) {
      throw std::invalid_argument("buckets: the buffer does not hold the parameters exactly");
    }
    bucket_of.resize(params.size());
    const int64_t element = static_cast<int64_t>(flat.element_size());
    for (size_t end = params.size(); end > 0;) {
      size_t first = end;
      int64_t bytes = 0;
      while (first > 0 && (first == end || bytes < cap)) {
        --first;
        bytes += params[first].numel() * element;
      }
      std::vector<size_t> in;
      for (size_t i = first; i < end; ++i) {
        in.push_back(i);
        bucket_of[i] = members.size();
      }
      const int64_t start = offsets[first];
      ranges.push_back(flat.narrow(0, start, (end < params.size() ? offsets[end] : offset) - start));
      members.push_back(std::move(in));
      end = first;
    }
    written.assign(params.size(), 0);
    pending.assign(members.size(), 0);
    for (size_t i = 0; i < params.size(); ++i) {
      hooks.push_back(params[i].register_hook([this, i](const at::Tensor& grad) { arrive(i, grad); }));
    }
  }

  ~Buckets() {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].remove_hook(hooks[i]);
    }
    guarded([&] { backend->shutdown(); });
  }

  // Sends the next bucket.
  void send_next() {
    const at::Tensor& range = ranges[sent.size()];
    std::vector<at::Tensor> tensors{bf16 ? range.to(at::kBFloat16) : range};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    options.timeout = timeout;
    sent.emplace_back(enqueued([&] { return backend->allreduce(tensors, options); }), tensors[0]);
  }

  // Before each backward pass of a step.
  void arm(bool last_pass) {
    std::lock_guard<std::mutex> guard(mutex);
    if (!sent.empty()) {
      throw std::logic_error("buckets: a backward pass after the step's last one");
    }
    armed = true;
    last = last_pass;
    for (size_t b = 0; b < members.size(); ++b) {
      pending[b] = members[b].size();
    }
  }

  // A hook: parameter i's gradient from this pass (autograd calls it once
  // per pass, with the sum of every path's contribution).
  void arrive(size_t i, const at::Tensor& grad) {
    std::lock_guard<std::mutex> guard(mutex);
    if (!armed || !grad.defined()) {
      return;
    }
    at::NoGradGuard no_grad;
    at::Tensor permuted = grad.permute(orders[i]);
    if (written[i]) {
      slots[i].add_(permuted);
    } else {
      slots[i].copy_(permuted);
      written[i] = 1;
    }
    if (!last) {
      return;
    }
    --pending[bucket_of[i]];
    while (sent.size() < members.size() && pending[sent.size()] == 0) {
      send_next();
    }
  }

  // After the step's last pass: the buckets not yet sent (with zeros for
  // the parameters no pass reached), the wait, the mean.
  void finish() {
    std::lock_guard<std::mutex> guard(mutex);
    at::NoGradGuard no_grad;
    while (sent.size() < members.size()) {
      for (size_t i : members[sent.size()]) {
        if (!written[i]) {
          slots[i].zero_();
        }
      }
      send_next();
    }
    auto in_flight = std::move(sent);
    clear();
    for (size_t b = 0; b < in_flight.size(); ++b) {
      auto& [work, reduced] = in_flight[b];
      await(work, stream_ordered, timeout);
      if (bf16) {
        ranges[b].copy_(reduced);
      }
    }
    flat.div_(size);
  }

  // Ready for the next step, whatever state the last left.
  void clear() {
    armed = last = false;
    std::fill(written.begin(), written.end(), 0);
    sent.clear();
  }
};

// c10d logs each failed attempt to connect or wait with a C++ stack;
// while a group forms, nothing short of fatal is logged: the failure comes
// back to the caller as one error naming the address, the rank and the cause.
struct QuietLogs {
  int saved = FLAGS_caffe2_log_level;
  QuietLogs() {
    FLAGS_caffe2_log_level = std::max(saved, 3);
  }
  ~QuietLogs() {
    FLAGS_caffe2_log_level = saved;
  }
};

c10::intrusive_ptr<c10d::Store> make_store(
    const char* kind,
    const char* address,
    int port,
    bool server,
    int size,
    std::chrono::milliseconds timeout) {
  std::string which(kind);
  if (which == "file") {
    auto store = c10::make_intrusive<c10d::FileStore>(address, size);
    store->setTimeout(timeout);
    return store;
  }
  if (which == "tcp") {
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = server;
    options.numWorkers = static_cast<std::size_t>(size);
    options.waitWorkers = false;
    options.timeout = timeout;
    return c10::make_intrusive<c10d::TCPStore>(address, options);
  }
  throw std::invalid_argument("store kind '" + which + "': expected file or tcp");
}

// `value` in a malloc'ed buffer handed to the caller (`*out`, `*length`),
// who frees it with simclr_dist_free_bytes.
void hand_over(const std::vector<uint8_t>& value, uint8_t** out, size_t* length) {
  *out = static_cast<uint8_t*>(std::malloc(value.size() + 1));
  std::copy(value.begin(), value.end(), *out);
  *length = value.size();
}

// `key`'s value in `store` if it is set now (`*found`; no wait), handed
// over. Asked after a collective failed, when the store's server may be
// gone with its process: that failure is the caller's, not logged with a
// stack.
void look_up(c10d::Store& store, const char* key, uint8_t** out, size_t* length, int* found) {
  QuietLogs quiet;
  *found = store.check({key}) ? 1 : 0;
  if (*found != 0) {
    hand_over(store.get(key), out, length);
  }
}

} // namespace

extern "C" {

const char* simclr_dist_last_error() {
  return last_error.c_str();
}

// A process group of `size` ranks meeting at a store: `kind` "file" (a path
// in `address`) or "tcp" (`address`:`port`, served by this process when
// `server`). `device_host` names the address Gloo's connections bind to
// (empty: the host's own name, as torch does), `interface` a network
// interface to use instead (empty: none). With `nccl`, CUDA tensors use NCCL
// (the `cuda` build only); otherwise Gloo serves CPU and CUDA tensors.
// Every key the group sets goes under `prefix`.
int simclr_dist_new_group(
    const char* kind,
    const char* address,
    int port,
    int server,
    const char* prefix,
    int rank,
    int size,
    int64_t timeout_ms,
    const char* device_host,
    const char* interface,
    int nccl,
    void** out) {
  return guarded([&] {
    std::chrono::milliseconds timeout(timeout_ms);
    QuietLogs quiet;
    auto store = make_store(kind, address, port, server != 0, size, timeout);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
    auto options = c10d::ProcessGroupGloo::Options::create_default(timeout);
    std::string host(device_host), iface(interface);
    if (!iface.empty()) {
      options->devices = {c10d::ProcessGroupGloo::createDeviceForInterface(iface)};
    } else if (!host.empty()) {
      options->devices = {c10d::ProcessGroupGloo::createDeviceForHostname(host)};
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
    gloo->setSequenceNumberForGroup();
    auto group = c10::make_intrusive<c10d::ProcessGroup>(prefixed, rank, size);
    using Type = c10d::ProcessGroup::BackendType;
    group->setBackend(c10::DeviceType::CPU, Type::GLOO, gloo);
    std::vector<c10::intrusive_ptr<c10d::Backend>> backends{gloo};
    if (nccl != 0) {
#ifdef SIMCLR_NCCL
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, nccl_options);
      backend->setSequenceNumberForGroup();
      group->setBackend(c10::DeviceType::CUDA, Type::NCCL, backend);
      group->setDefaultBackend(Type::NCCL);
      backends.push_back(backend);
#else
      throw std::invalid_argument("NCCL needs the cuda build (cargo --features cuda)");
#endif
    } else {
      group->setBackend(c10::DeviceType::CUDA, Type::GLOO, gloo);
      group->setDefaultBackend(Type::GLOO);
    }
    if (gloo->getRank() != rank || gloo->getSize() != size || gloo->getBackendName() != "gloo") {
      throw std::runtime_error("the Gloo backend reads back a different rank, size or name");
    }
    *out = new Group{prefixed, group, backends, timeout, rank, size, options, nccl != 0};
  });
}

// A TCP store served by this process alone, on `address` at a port the OS
// picks (bound, never released before use): the launcher's, as torchrun's
// agent serves its workers'. `*port` is where it listens.
int simclr_dist_serve_store(const char* address, int64_t timeout_ms, void** out, int* port) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = 0;
    options.isServer = true;
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(address, options);
    *port = store->getPort();
    *out = new c10::intrusive_ptr<c10d::TCPStore>(std::move(store));
  });
}

// `key`'s value in the store this process serves, if it is set (`*found`;
// no wait); `*out` as simclr_dist_store_get's.
int simclr_dist_served_lookup(void* store, const char* key, uint8_t** out, size_t* length, int* found) {
  return guarded([&] { look_up(**static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store), key, out, length, found); });
}

void simclr_dist_free_store(void* store) {
  delete static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store);
}

void simclr_dist_free(void* group) {
  auto* g = static_cast<Group*>(group);
  guarded([&] {
    for (auto& backend : g->backends) {
      backend->shutdown();
    }
  });
  delete g;
}

// In place; `op` 0 sum, 1 max, 2 min.
int simclr_dist_all_reduce(void* group, at::Tensor* tensor, int op) {
  return guarded([&] {
    static const c10d::ReduceOp::RedOpType ops[] = {
        c10d::ReduceOp::SUM, c10d::ReduceOp::MAX, c10d::ReduceOp::MIN};
    if (op < 0 || op > 2) {
      throw std::invalid_argument("reduce op " + std::to_string(op));
    }
    static_cast<Group*>(group)->all_reduce(*tensor, ops[op]);
  });
}

int simclr_dist_broadcast(void* group, at::Tensor* tensor, int root) {
  return guarded([&] { static_cast<Group*>(group)->broadcast(*tensor, root); });
}

int simclr_dist_all_gather(void* group, at::Tensor* output, at::Tensor* input) {
  return guarded([&] { static_cast<Group*>(group)->all_gather(*output, *input); });
}

int simclr_dist_reduce_scatter(void* group, at::Tensor* output, at::Tensor* input) {
  return guarded([&] { static_cast<Group*>(group)->reduce_scatter(*output, *input); });
}

// The differentiable collectives: `*out` is a new tensor with a grad_fn.
int simclr_dist_all_reduce_sum_grad(void* group, at::Tensor* input, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(AllReduceSum::apply(*input, reinterpret_cast<int64_t>(group)));
  });
}

int simclr_dist_all_gather_grad(void* group, at::Tensor* input, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(AllGather::apply(*input, reinterpret_cast<int64_t>(group)));
  });
}

// Global BatchNorm in training (GlobalBatchNorm above); `weight` and
// `bias` may be null; the running statistics are updated in place.
// `images`, null where every rank's slice is this one's size, holds each
// rank's number of images.
int simclr_dist_batch_norm(
    void* group,
    at::Tensor* input,
    at::Tensor* weight,
    at::Tensor* bias,
    at::Tensor* running_mean,
    at::Tensor* running_var,
    double momentum,
    double eps,
    const int64_t* images,
    at::Tensor** out) {
  return guarded([&] {
    Group* g = static_cast<Group*>(group);
    std::vector<int64_t> counts;
    if (images != nullptr) {
      counts.assign(images, images + g->size);
      if (counts[g->rank] != input->size(0)) {
        throw std::runtime_error(
            "BatchNorm was told rank " + std::to_string(g->rank) + " holds " + std::to_string(counts[g->rank]) +
            " images, but its input has " + std::to_string(input->size(0)));
      }
      for (int64_t n : counts) {
        if (n < 1) {
          throw std::runtime_error("every rank needs at least one image in a training BatchNorm");
        }
      }
    }
    *out = new at::Tensor(GlobalBatchNorm::apply(
        *input,
        weight ? *weight : at::Tensor(),
        bias ? *bias : at::Tensor(),
        *running_mean,
        *running_var,
        momentum,
        eps,
        reinterpret_cast<int64_t>(group),
        counts));
  });
}

// Gradient buckets (Buckets above) over `count` parameters whose gradients
// fill `flat` in order, each permuted by its `orders` (dims, `ranks[i]` of
// them, one after another in `dims`).
int simclr_dist_buckets_new(
    void* group,
    at::Tensor** params,
    const int64_t* dims,
    const int64_t* ranks,
    size_t count,
    at::Tensor* flat,
    int64_t cap_bytes,
    int bf16,
    void** out) {
  return guarded([&] {
    std::vector<at::Tensor> tensors;
    std::vector<std::vector<int64_t>> orders;
    for (size_t i = 0; i < count; ++i) {
      tensors.push_back(*params[i]);
      orders.emplace_back(dims, dims + ranks[i]);
      dims += ranks[i];
    }
    *out = new Buckets(static_cast<Group*>(group), std::move(tensors), std::move(orders), *flat, cap_bytes, bf16 != 0);
  });
}

int simclr_dist_buckets_arm(void* buckets, int last) {
  return guarded([&] { static_cast<Buckets*>(buckets)->arm(last != 0); });
}

int simclr_dist_buckets_finish(void* buckets) {
  return guarded([&] { static_cast<Buckets*>(buckets)->finish(); });
}

// How many buckets the step has sent so far, and how many there are.
void simclr_dist_buckets_sent(void* buckets, size_t* sent, size_t* count) {
  auto* b = static_cast<Buckets*>(buckets);
  std::lock_guard<std::mutex> guard(b->mutex);
  *sent = b->sent.size();
  *count = b->members.size();
}

void simclr_dist_buckets_clear(void* buckets) {
  auto* b = static_cast<Buckets*>(buckets);
  std::lock_guard<std::mutex> guard(b->mutex);
  b->clear();
}

void simclr_dist_buckets_free(void* buckets) {
  delete static_cast<Buckets*>(buckets);
}

// Store access for the launcher's checks (config hashes, errors to report).
int simclr_dist_store_set(void* group, const char* key, const uint8_t* data, size_t length) {
  return guarded([&] {
    std::vector<uint8_t> value(data, data + length);
    static_cast<Group*>(group)->store->set(key, value);
  });
}

// Waits up to the group's timeout for `key`; `*out` is malloc'ed, freed by
// the caller with simclr_dist_free_bytes.
int simclr_dist_store_get(void* group, const char* key, uint8_t** out, size_t* length) {
  return guarded([&] {
    hand_over(static_cast<Group*>(group)->store->get(key), out, length);
  });
}

// `key`'s value in the group's store, if it is set now (`*found`; no wait);
// `*out` as simclr_dist_store_get's.
int simclr_dist_store_lookup(void* group, const char* key, uint8_t** out, size_t* length, int* found) {
  return guarded([&] { look_up(*static_cast<Group*>(group)->store, key, out, length, found); });
}

// Adds `amount` to the counter at `key` (0 reads it; no wait); `*value`
// is its sum.
int simclr_dist_store_add(void* group, const char* key, int64_t amount, int64_t* value) {
  return guarded([&] {
    QuietLogs quiet;
    *value = static_cast<Group*>(group)->store->add(key, amount);
  });
}

void simclr_dist_free_bytes(uint8_t* bytes) {
  std::free(bytes);
}

} // extern "C"
