"""Where a bf16 training step's BatchNorm time could go (issue 21, acceptance 3).

BatchNorm is the largest share of the bf16 ResNet-18 step on an H200 after
the convolutions (38% of PyTorch's kernel time at 256 images:
benchmarks/h200-2026-12-04/call1/profile_pytorch_bf16_sgd.txt), and with a
bf16 input ATen's batch_norm runs its own channels-last kernels, not
cuDNN's (that profile's batch_norm_collect_statistics_channels_last and the
like), in both implementations. Before a cuDNN path is built into simclr (tch binds
`Tensor::cudnn_batch_norm`, differentiable), this measures it: every
BatchNorm of ResNet-18 with the CIFAR stem at 32 px, on 2N views in bf16,
channels_last, with fp32 parameters as under autocast, each followed by
the ReLU that follows it in the network, forward and backward:

- `native`: F.batch_norm (what both implementations run today)
- `cudnn`: aten.cudnn_batch_norm on the bf16 input (persistent spatial
  mode, which ATen picks for a channels-last input in training)
- `cudnn_bf16_parameters`: the same with the parameters cast to bf16 (the
  running statistics too), in case cuDNN takes a bf16 input only so
- `cudnn_fp32`: the input cast to fp32 and back around F.batch_norm, which
  ATen then sends to cuDNN
- `sum_statistics`: ATen's kernels given statistics from two fp32
  reductions (`SumStatistics`), where its own statistics kernel is slow

- `fp16_cudnn`: an fp16 input with fp32 parameters, which ATen itself sends
  to cuDNN (what an fp16 step with loss scaling would run)
- `fp16_native`: the same with cuDNN turned off, ATen's kernels in fp16

Each is timed two ways over ITERATIONS passes, the layers in the network's
order: CUDA events around the passes (what a step would see, launches
included: the small layers are bound by the host issuing them) and the
kernels' own device time from torch.profiler (what acceptance 3 at 512
images needs less of, since both steps run near their kernels' time there),
with the kernels launched per pass. Outputs and input gradients are
compared with `native`'s (the fp16 variants' inputs are the bf16 ones'
fp32 draws rounded to fp16). Prints one JSON object. On a CPU it runs
`native` and `sum_statistics` untimed (a check of the script).

    python tools/bench/bench_batch_norm.py --batch-size 512
"""
import argparse
import contextlib
import json

import torch
import torch.nn.functional as F

# (channels, side) of each BatchNorm2d of ResNet-18 with the CIFAR stem at
# 32 px, and whether a ReLU follows it: the stem; per basic block two, the
# first followed by a ReLU and the second by the residual sum and a ReLU
# (counted with it); the downsampling shortcut's (no ReLU of its own).
LAYERS = (
    [(64, 32, True)]
    + [(64, 32, True)] * 4
    + [(128, 16, True)] * 4 + [(128, 16, False)]
    + [(256, 8, True)] * 4 + [(256, 8, False)]
    + [(512, 4, True)] * 4 + [(512, 4, False)]
)


def native(x, weight, bias, mean, var):
    return F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)


def cudnn(x, weight, bias, mean, var):
    return torch.ops.aten.cudnn_batch_norm(x, weight, bias, mean, var, True, 0.1, 1e-5)[0]


def cudnn_bf16_parameters(x, weight, bias, mean, var):
    # Where cuDNN's BatchNorm takes a bf16 input only with parameters of its type.
    kind = x.dtype
    out = torch.ops.aten.cudnn_batch_norm(x, weight.to(kind), bias.to(kind), mean.to(kind), var.to(kind), True, 0.1, 1e-5)
    return out[0]


def cudnn_fp32(x, weight, bias, mean, var):
    y = F.batch_norm(x.float(), mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)
    return y.to(x.dtype)


class SumStatistics(torch.autograd.Function):
    """BatchNorm in training with its statistics from two fp32 reductions
    (the sum and the sum of squares, each one pass over the bf16 input),
    where ATen's channels-last statistics kernel ran at about a tenth of
    the H200's memory bandwidth in benchmarks/h200-2026-12-04 (1.15 ms a
    step for 630 MB); then ATen's inference transform given them, and
    ATen's training backward given them, so only the statistics' kernels
    differ from `native` (the variance as E[x^2] - E[x]^2: cancellation
    where a channel's mean is large against its spread)."""

    @staticmethod
    def forward(context, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() / x.shape[1]
        kind = torch.promote_types(x.dtype, torch.float32)
        mean = torch.sum(x, dims, dtype=kind) / count
        squares = torch.linalg.vector_norm(x, 2, dims, dtype=kind).square() / count
        var = (squares - mean.square()).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        context.save_for_backward(x, weight, mean, invstd)
        context.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(context, grad):
        x, weight, mean, invstd = context.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, context.eps, [True, True, True])
        return dx, dw, db, None


def sum_statistics(x, weight, bias, mean, var):
    return SumStatistics.apply(x, weight, bias, 1e-5)


def layers(batch, device, dtype):
    """Each layer's input, parameters and output gradient; drawn in fp32 from
    one seed and rounded to `dtype`, so every dtype sees the same values."""
    torch.manual_seed(0)
    made = []
    for channels, side, relu in LAYERS:
        x = torch.randn(2 * batch, channels, side, side, device=device).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        weight = (1 + 0.1 * torch.randn(channels, device=device)).requires_grad_(True)
        bias = (0.1 * torch.randn(channels, device=device)).requires_grad_(True)
        grad = torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        made.append((x, weight, bias, grad, relu))
    return made


def run(norm, made):
    """Forward and backward through every layer; the outputs and input gradients."""
    outputs = []
    for x, weight, bias, grad, relu in made:
        channels = x.shape[1]
        mean = torch.zeros(channels, device=x.device)
        var = torch.ones(channels, device=x.device)
        x.grad = weight.grad = bias.grad = None
        y = norm(x, weight, bias, mean, var)
        if relu:
            y = F.relu(y)
        y.backward(grad)
        outputs.append((y.detach(), x.grad))
    return outputs


@contextlib.contextmanager
def cudnn_enabled(enabled):
    """cuDNN on or off, alone: torch.backends.cudnn.flags() would also reset
    its benchmark mode."""
    torch.backends.cudnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = True


def timed(norm, made, iterations):
    """Milliseconds a pass over the layers takes, by CUDA events, and by the
    profiler: its kernels' device time and how many it launched."""
    for _ in range(5):
        run(norm, made)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        run(norm, made)
    end.record()
    torch.cuda.synchronize()
    elapsed = start.elapsed_time(end) / iterations
    result = {"ms_per_pass": elapsed}
    # The profiler's part never costs the events' number.
    try:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            for _ in range(iterations):
                run(norm, made)
            torch.cuda.synchronize()
        # As the profiler's own table totals them: device events, not the
        # annotations that span them.
        kernels = [e for e in profile.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        result["kernel_ms_per_pass"] = sum(e.self_device_time_total for e in kernels) / 1000 / iterations
        result["kernels_per_pass"] = len(kernels) / iterations
    except Exception as error:  # noqa: BLE001 (reported, not raised)
        result["profiler_error"] = str(error).splitlines()[0]
    return result


# name: (function, input dtype, cuDNN enabled)
VARIANTS = {
    "native": (native, torch.bfloat16, True),
    "cudnn": (cudnn, torch.bfloat16, True),
    "cudnn_bf16_parameters": (cudnn_bf16_parameters, torch.bfloat16, True),
    "cudnn_fp32": (cudnn_fp32, torch.bfloat16, True),
    "sum_statistics": (sum_statistics, torch.bfloat16, True),
    "fp16_cudnn": (native, torch.float16, True),
    "fp16_native": (native, torch.float16, False),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=512, help="images; the layers see two views of each")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = list(VARIANTS) if device.type == "cuda" else ["native", "sum_statistics"]
    made = {dtype: layers(args.batch_size, device, dtype) for dtype in {VARIANTS[name][1] for name in names}}
    report = {"batch_size": args.batch_size, "views": 2 * args.batch_size, "layers": len(LAYERS),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    reference = run(native, made[torch.bfloat16])
    for name in names:
        norm, dtype, with_cudnn = VARIANTS[name]
        try:
            with cudnn_enabled(with_cudnn):
                outputs = run(norm, made[dtype])
        except RuntimeError as error:
            report[name] = {"error": str(error).splitlines()[0]}
            continue
        # bf16 outputs: a difference of one unit in the last place is 2^-8 relative.
        worst_output = max((a.float() - b.float()).abs().max().item() for (a, _), (b, _) in zip(outputs, reference))
        worst_gradient = max((a.float() - b.float()).abs().max().item() for (_, a), (_, b) in zip(outputs, reference))
        result = {"output_max_difference": worst_output, "input_gradient_max_difference": worst_gradient}
        if device.type == "cuda":
            with cudnn_enabled(with_cudnn):
                result.update(timed(norm, made[dtype], args.iterations))
        report[name] = result
    for name in names:
        if "ms_per_pass" in report[name]:
            native_time = report["native"]
            report[name]["speedup_over_native"] = native_time["ms_per_pass"] / report[name]["ms_per_pass"]
            if "kernel_ms_per_pass" in report[name] and "kernel_ms_per_pass" in native_time:
                report[name]["kernel_speedup_over_native"] = (native_time["kernel_ms_per_pass"]
                                                              / report[name]["kernel_ms_per_pass"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
