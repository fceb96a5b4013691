#!/usr/bin/env python3
"""The PyTorch reference for `simclr bench`: the same model (torchvision
ResNet, the chosen stem, `fc` removed, MLP head to 128), NT-Xent at tau 0.1,
one optimiser step (LARS unless --optimizer says sgd or adamw) per batch
of 2N random views, and the encoder's forward pass in eval mode, timed the
same way. Prints one JSON line like `simclr bench
--json`.

    "$(tools/python.sh)" tools/reference/bench_pytorch.py --arch resnet18 --stem cifar \
        --batch-size 64 --image-size 32 --steps 5 --threads 2

Run `simclr bench` with the same arguments in the same session (see
tools/bench/bench_cpu.sh) and compare the two.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def nt_xent(z, tau):
    n = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def lars_step(params, velocities, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
    """The paper's LARS (tf2/lars_optimizer.py), as simclr implements it."""
    for w, v in zip(params, velocities):
        g = w.grad
        if w.dim() > 1:
            g = g + weight_decay * w
            w_norm, g_norm = w.norm(), g.norm()
            usable = (w_norm > 0) & (g_norm > 0)
            trust = torch.where(usable, eta * w_norm / g_norm, torch.ones_like(w_norm))
            step = g * (trust * lr)
        else:
            step = g * lr
        v.mul_(momentum).add_(step)
        w.sub_(v)


def profile(step, device, steps):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier, as simclr's")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--hidden-dim", type=int, default=0, help="head hidden width; 0 = the size of h")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast and channels_last (CUDA)")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 autocast with GradScaler and channels_last (as simclr on a GPU without bf16; "
                             "sgd or adamw)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last without bf16 (as simclr does)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many training steps with torch.profiler and print, to stderr, the "
                             "kernels by device time (the same kernels simclr calls: where a step's time goes)")
    parser.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"],
                        help="lars: the loop above, per tensor, as PyTorch SimCLR code writes it; "
                             "sgd and adamw: torch.optim's (multi-tensor foreach kernels on CUDA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    encoder = getattr(torchvision.models, args.arch)()
    stem_width = 64
    if args.width != 1:
        # simclr's width multiplier: every stage's planes scaled, rounded
        # half away from zero, as Rust rounds.
        block = type(encoder.layer1[0])
        planes = [max(1, math.floor(64 * 2**stage * args.width + 0.5)) for stage in range(4)]
        stem_width = encoder.inplanes = planes[0]
        encoder.conv1 = torch.nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        encoder.bn1 = torch.nn.BatchNorm2d(stem_width)
        for stage in range(4):
            depth = len(getattr(encoder, f"layer{stage + 1}"))
            layer = encoder._make_layer(block, planes[stage], depth, stride=1 if stage == 0 else 2)
            setattr(encoder, f"layer{stage + 1}", layer)
        encoder.fc = torch.nn.Linear(planes[3] * block.expansion, 1000)
    features = encoder.fc.in_features
    encoder.fc = torch.nn.Identity()
    if args.stem == "cifar":
        encoder.conv1 = torch.nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
        encoder.maxpool = torch.nn.Identity()
    hidden = args.hidden_dim or features
    head = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 128))
    model = torch.nn.Sequential(encoder, head).to(device)
    views = torch.randn(2 * args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.fp16 and args.optimizer == "lars":
        parser.error("--fp16 takes --optimizer sgd or adamw (GradScaler steps a torch.optim optimizer)")
    if args.bf16 or args.fp16 or args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        views = views.contiguous(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    velocities = [torch.zeros_like(p) for p in params]
    # Weight decay 1e-6 on weights, none on BatchNorm and biases, as simclr's defaults.
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 1e-6},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    elif args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=1e-3)
    if args.fp16:
        def update():
            scaler.step(optimizer)
            scaler.update()
    elif args.optimizer == "lars":
        update = lambda: lars_step(params, velocities, 0.1)
    else:
        update = optimizer.step
    half = torch.float16 if args.fp16 else torch.bfloat16
    autocast = lambda: torch.autocast(device.type, dtype=half, enabled=args.bf16 or args.fp16)

    def train_step():
        model.train()
        with autocast():
            z = model(views)
        loss = nt_xent(z.float(), 0.1)
        for p in params:
            p.grad = None
        scaler.scale(loss).backward()
        update()

    images = views[: args.batch_size]

    @torch.no_grad()
    def forward():
        encoder.eval()
        with autocast():
            return encoder(images)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(step):
        for _ in range(args.warmup):
            step()
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return time.perf_counter() - started

    train_seconds = timed(train_step)
    # The host's time to issue one step from an idle device (simclr bench's
    # train_issue_ms): near the step time when launching kernels is the bound.
    issue = []
    for _ in range(5):
        started = time.perf_counter()
        train_step()
        issue.append(time.perf_counter() - started)
        sync()
    issue_ms = 1000 * sorted(issue)[len(issue) // 2]
    if args.profile:
        profile(train_step, device, args.profile)
    forward_seconds = timed(forward)
    done = args.steps * args.batch_size
    print(json.dumps({
        "implementation": f"pytorch {torch.__version__}"
        + (" bf16+channels_last" if args.bf16 else " fp16+GradScaler+channels_last" if args.fp16
           else " channels_last" if args.channels_last else ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "optimizer": args.optimizer,
        "train_images_per_second": done / train_seconds,
        "train_ms_per_step": 1000 * train_seconds / args.steps,
        "train_issue_ms": issue_ms,
        "forward_images_per_second": done / forward_seconds,
    }))


if __name__ == "__main__":
    main()
