#!/usr/bin/env python3
"""The PyTorch reference for the time-to-accuracy comparison (issue 5):
SimCLR on CIFAR-10 with the settings tools/device/device-bench.sh gives `simclr
train`, trained for a wall-clock budget, then scored by the kNN monitor.

Model: torchvision ResNet-18 with the CIFAR stem, `fc` removed, MLP head
512-2048-128. NT-Xent (cosine, tau), SGD (momentum 0.9, weight decay on
weights but not BatchNorm or biases), learning rate base x batch/256, one
warm-up epoch then cosine per step. Augmentation on the device, whole
batches with per-sample parameters: random resized crop (scale 0.08-1,
ratio 3/4-4/3, `roi_align`), flip, colour jitter (s = 0.5, p = 0.8,
torchvision's formulas, fixed order), grayscale (p = 0.2). On CUDA: bf16
autocast and channels_last. Budget, as `train.time_budget_seconds` plans
it: as many whole epochs as fit at the first epoch's pace, then, final, two
plus as many as fit in the time left at the second's (the first pays cuDNN's
autotuning and the allocator's growth).
kNN: k = 200, T = 0.1, cosine, bank = every training image, queries = every
test image, centre views. Prints one JSON line.

    python tools/reference/train_pytorch.py --data /tmp/cifar10 --budget 180 --device cuda
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


def augment(images: torch.Tensor, strength: float = 0.5) -> torch.Tensor:
    n, _, h, w = images.shape
    device = images.device
    x = images.float() / 255.0
    area = h * w * torch.empty(n, device=device).uniform_(0.08, 1.0)
    ratio = torch.exp(torch.empty(n, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)))
    cw = torch.sqrt(area * ratio).clamp(max=w)
    ch = torch.sqrt(area / ratio).clamp(max=h)
    left = torch.rand(n, device=device) * (w - cw)
    top = torch.rand(n, device=device) * (h - ch)
    boxes = torch.stack([torch.arange(n, device=device, dtype=torch.float), left, top, left + cw, top + ch], 1)
    x = roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
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
    parser.add_argument("--limit", type=int, default=0, help="use only this many images per split (tests)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    root = pathlib.Path(args.data)
    train_images, train_labels = load_split(root / "train", device)
    test_images, test_labels = load_split(root / "test", device)
    if args.limit:
        keep = torch.randperm(len(train_images), device=device)[: args.limit]
        train_images, train_labels = train_images[keep], train_labels[keep]
        keep = torch.randperm(len(test_images), device=device)[: args.limit]
        test_images, test_labels = test_images[keep], test_labels[keep]

    encoder = torchvision.models.resnet18()
    encoder.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    encoder.maxpool = torch.nn.Identity()
    encoder.fc = torch.nn.Identity()
    head = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
    model = torch.nn.Sequential(encoder, head).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    peak = args.learning_rate * args.batch_size / 256
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak, momentum=0.9,
    )
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    steps_per_epoch = len(train_images) // args.batch_size
    epochs = 10**6
    step = 0
    trained = 0.0
    epoch = 0
    while epoch < epochs:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_images), device=device)
        for b in range(steps_per_epoch):
            total = epochs * steps_per_epoch
            lr = peak * (step + 1) / steps_per_epoch if step < steps_per_epoch else \
                0.5 * peak * (1 + math.cos(math.pi * (step - steps_per_epoch) / max(1, total - steps_per_epoch)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = train_images[order[b * args.batch_size : (b + 1) * args.batch_size]]
            views = torch.cat([augment(batch), augment(batch)])
            if cuda:
                views = views.contiguous(memory_format=torch.channels_last)
            with autocast():
                z = model(views)
            loss = nt_xent(z, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        trained += seconds
        epoch += 1
        if epoch == 1:
            epochs = max(1, int(args.budget // seconds))
        elif epoch == 2:
            epochs = 2 + int(max(0.0, args.budget - trained) // seconds)
    bank = features(encoder, train_images, autocast)
    queries = features(encoder, test_images, autocast)
    top1 = knn_top1(bank, train_labels, queries, test_labels)
    print(json.dumps({
        "implementation": f"pytorch {torch.__version__}",
        "device": str(torch.cuda.get_device_name() if cuda else device),
        "epochs": epochs,
        "train_seconds": trained,
        "images_per_second": epochs * steps_per_epoch * args.batch_size / trained,
        "knn_top1": top1,
    }))


if __name__ == "__main__":
    main()
