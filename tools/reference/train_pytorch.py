#!/usr/bin/env python3
"""The PyTorch reference for the time-to-accuracy comparison (issue 5):
SimCLR on CIFAR-10 with the settings tools/device/device-bench.sh gives `simclr
train`, trained for a wall-clock budget, then scored by the kNN monitor.

Model: torchvision ResNet-18 with the CIFAR stem, `fc` removed, MLP head
512-2048-128 (`--width w` scales every convolution's channels by w, as
`model.width_multiplier` does, and the head's input to 512w; `--hidden-dim`
sets its middle layer). NT-Xent (cosine, tau), SGD (momentum 0.9, weight decay on
weights but not BatchNorm or biases), learning rate base x batch/256,
`--warmup-epochs` (default 1) of linear warm-up then cosine per step. Augmentation on the device, whole
batches with per-sample parameters: random resized crop (scale `--min-scale`-1,
default 0.08-1, ratio 3/4-4/3, `roi_align`), flip, colour jitter (s = 0.5, p = 0.8,
torchvision's formulas, fixed order), grayscale (p = 0.2). channels_last everywhere (on this
project's 2-core CPU a 0.25x ResNet-18 step at 32 px takes 0.39 s in it
against 0.55 s contiguous); bf16 autocast where simclr's `train.mixed_precision` takes it (CUDA,
a CPU with AVX-512 BF16), unless `--fp32`. Budget, as `train.time_budget_seconds` plans
it: as many whole epochs as fit at the first epoch's pace, then two plus as
many as fit in the time left at the second's (the first pays cuDNN's
autotuning and the allocator's growth), then fewer whenever the warm epochs'
mean pace says the plan would end past the budget.
kNN: k = 200, T = 0.1, cosine, bank = every training image, queries = every
test image, centre views. Prints one JSON line.

    python tools/reference/train_pytorch.py --data /tmp/cifar10 --budget 180 --device cuda
    python tools/reference/train_pytorch.py --data /tmp/cifar10-subset --budget 240 --device cpu \
        --width 0.25 --hidden-dim 128 --batch-size 128   # tools/bench/race_cpu.sh, with the preset's recipe

The defaults are `--preset cifar10-fast`'s recipe; the races pass it from the
preset itself (tools/reference/preset_recipe.py).
"""
import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import decode_jpeg, read_file
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
LUMA = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)


def load_split(root: pathlib.Path, device):
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            paths.append(path)
            labels.append(label)
    images = torch.stack([decode_jpeg(read_file(str(p))) for p in paths])
    return images.to(device), torch.tensor(labels, device=device)


class ResNet18(torchvision.models.ResNet):
    """torchvision's ResNet-18 with the CIFAR stem (3x3 convolution, stride
    1, no max-pool) and every stage's channels scaled by `width`; its own
    initialisation."""

    def __init__(self, width: float = 1.0):
        self.scale = lambda channels: max(1, round(channels * width))
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
        stem = self.scale(64)
        self.conv1 = torch.nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        torch.nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = torch.nn.BatchNorm2d(stem)
        self.maxpool = torch.nn.Identity()
        self.fc = torch.nn.Identity()
        self.feature_dim = self.scale(512)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage: its input is the (scaled) stem
            self.inplanes = self.scale(64)
        return super()._make_layer(block, self.scale(planes), blocks, stride, dilate)


def augment(images: torch.Tensor, size: int = 0, strength: float = 0.5, min_scale: float = 0.08) -> torch.Tensor:
    """Views of `size` px (0: the images' own), as `augment.view_size`, each
    cropped from at least `min_scale` of its image's area."""
    n, _, h, w = images.shape
    device = images.device
    x = images.float() / 255.0
    area = h * w * torch.empty(n, device=device).uniform_(min_scale, 1.0)
    ratio = torch.exp(torch.empty(n, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)))
    cw = torch.sqrt(area * ratio).clamp(max=w)
    ch = torch.sqrt(area / ratio).clamp(max=h)
    left = torch.rand(n, device=device) * (w - cw)
    top = torch.rand(n, device=device) * (h - ch)
    boxes = torch.stack([torch.arange(n, device=device, dtype=torch.float), left, top, left + cw, top + ch], 1)
    x = roi_align(x, boxes, output_size=(size or h, size or w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(n, device=device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    jitter = (torch.rand(n, device=device) < 0.8).view(-1, 1, 1, 1)
    spread = 0.8 * strength
    factor = lambda: torch.empty(n, 1, 1, 1, device=device).uniform_(max(0.0, 1 - spread), 1 + spread)
    gray = lambda t: (t * LUMA.to(device)).sum(1, keepdim=True)
    j = (x * factor()).clamp(0, 1)  # brightness
    c = factor()
    j = (c * j + (1 - c) * gray(j).mean((2, 3), keepdim=True)).clamp(0, 1)  # contrast
    s = factor()
    j = (s * j + (1 - s) * gray(j)).clamp(0, 1)  # saturation
    hue = torch.empty(n, 1, 1, device=device).uniform_(-0.2 * strength, 0.2 * strength)
    hsv = _rgb_to_hsv(j)
    hsv = torch.cat([(hsv[:, :1] + hue.unsqueeze(1)) % 1.0, hsv[:, 1:]], 1)
    j = _hsv_to_rgb(hsv)
    x = torch.where(jitter, j, x)
    grayscale = (torch.rand(n, device=device) < 0.2).view(-1, 1, 1, 1)
    x = torch.where(grayscale, gray(x).expand(-1, 3, -1, -1), x)
    return (x - MEAN.to(device)) / STD.to(device)


def nt_xent(z: torch.Tensor, tau: float) -> torch.Tensor:
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def dcl(z: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent with the positive out of the denominator (decoupled contrastive
    learning, Yeh et al. 2022): `loss.objective = "dcl"`."""
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / tau
    rows = torch.arange(2 * n, device=z.device)
    partner = (rows + n) % (2 * n)
    positive = logits[rows, partner]
    excluded = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    excluded[rows, partner] = True
    return (torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1) - positive).mean()


LOSSES = {"nt-xent": nt_xent, "dcl": dcl}


@torch.no_grad()
def features(encoder, images, autocast, batch=1024):
    encoder.eval()
    out = []
    for i in range(0, len(images), batch):
        x = (images[i : i + batch].float() / 255.0 - MEAN.to(images.device)) / STD.to(images.device)
        with autocast():
            out.append(F.normalize(encoder(x).float(), dim=1))
    return torch.cat(out)


@torch.no_grad()
def knn_top1(bank, bank_labels, queries, query_labels, classes=10, k=200, t=0.1):
    correct = 0
    for i in range(0, len(queries), 1024):
        similarity = queries[i : i + 1024] @ bank.T
        weights, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(index), classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[index], (weights / t).exp())
        correct += (votes.argmax(1) == query_labels[i : i + 1024]).sum().item()
    return correct / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="folder with train/ and test/ ImageFolders")
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=0.5, help="x batch/256")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--loss", choices=sorted(LOSSES), default="nt-xent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view-size", type=int, default=0,
                        help="side of the training views in px (augment.view_size; 0: the images' own)")
    parser.add_argument("--min-scale", type=float, default=0.08,
                        help="the random resized crop's smallest share of the image's area (its min_scale)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of the ResNet-18")
    parser.add_argument("--hidden-dim", type=int, default=2048, help="the projection head's middle layer")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--limit", type=int, default=0, help="use only this many images per split (tests)")
    parser.add_argument("--fp32", action="store_true",
                        help="no bf16 autocast (train.mixed_precision = false), which is otherwise on where simclr's is: "
                             "CUDA, and a CPU with AVX-512 BF16")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = not args.fp32 and (cuda or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()))
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = pathlib.Path(args.data)
    train_images, train_labels = load_split(root / "train", device)
    test_images, test_labels = load_split(root / "test", device)
    if args.limit:
        keep = torch.randperm(len(train_images), device=device)[: args.limit]
        train_images, train_labels = train_images[keep], train_labels[keep]
        keep = torch.randperm(len(test_images), device=device)[: args.limit]
        test_images, test_labels = test_images[keep], test_labels[keep]

    encoder = ResNet18(args.width)
    features_dim = encoder.feature_dim
    hidden = args.hidden_dim
    head = torch.nn.Sequential(torch.nn.Linear(features_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 128))
    model = torch.nn.Sequential(encoder, head).to(device)
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    peak = args.learning_rate * args.batch_size / 256
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak, momentum=0.9,
    )
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    steps_per_epoch = len(train_images) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"train_pytorch.py: {len(train_images)} training images do not fill one batch of {args.batch_size}")
    warmup = round(args.warmup_epochs * steps_per_epoch)
    epochs = 10**6
    step = 0
    trained = 0.0
    epoch_seconds = []
    epoch = 0
    while epoch < epochs:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_images), device=device)
        for b in range(steps_per_epoch):
            total = epochs * steps_per_epoch
            lr = peak * (step + 1) / warmup if step < warmup else \
                0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = train_images[order[b * args.batch_size : (b + 1) * args.batch_size]]
            views = torch.cat([augment(batch, args.view_size, min_scale=args.min_scale) for _ in range(2)])
            views = views.contiguous(memory_format=torch.channels_last)
            with autocast():
                z = model(views)
            loss = LOSSES[args.loss](z, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        trained += seconds
        epoch_seconds.append(seconds)
        epoch += 1
        if epoch == 1:
            epochs = max(1, int(args.budget // seconds))
        elif epoch == 2:
            epochs = 2 + int(max(0.0, args.budget - trained) // seconds)
        else:
            # The plan only shrinks, when the warm epochs' mean pace says it
            # would end past the budget.
            pace = sum(epoch_seconds[1:]) / len(epoch_seconds[1:])
            fits = epoch + int(max(0.0, args.budget - trained) // pace)
            if trained + (epochs - epoch) * pace > args.budget and fits < epochs:
                epochs = fits
    # The kNN's features in bf16 on CUDA alone, as before bf16 training on
    # the CPU: there they stay fp32, as simclr's monitor computes them.
    features_autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    bank = features(encoder, train_images, features_autocast)
    queries = features(encoder, test_images, features_autocast)
    top1 = knn_top1(bank, train_labels, queries, test_labels)
    print(json.dumps({
        "implementation": f"pytorch {torch.__version__}",
        "device": str(torch.cuda.get_device_name() if cuda else device),
        "epochs": epochs,
        "threads": torch.get_num_threads(),
        "precision": "bf16" if bf16 else "fp32",
        "train_seconds": trained,
        "images_per_second": epochs * steps_per_epoch * args.batch_size / trained,
        "knn_top1": top1,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
    }))


if __name__ == "__main__":
    main()
