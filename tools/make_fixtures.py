#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures that the Rust tests compare against.

Run by hand, never in CI:

    python3 -m venv ~/.cache/simclr/venv
    ~/.cache/simclr/venv/bin/pip install torch==2.11.0 torchvision==0.26.0 safetensors numpy scikit-learn
    ~/.cache/simclr/venv/bin/python tools/make_fixtures.py [resnet|loss|optimizer|eval ...]

Output: crates/simclr/tests/fixtures/*.safetensors (small: inputs, outputs,
gradients). Model weights are not stored: every tensor is filled by
`formula_fill` below, a closed form of the element index that
crates/simclr/tests/parity.rs reproduces, so ResNet-50 needs no 94 MB file.
"""
import math
import pathlib

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates" / "simclr" / "tests" / "fixtures"


def formula_fill(name: str, index: int, shape) -> torch.Tensor:
    """Deterministic, non-trivial values for tensor number `index` (in sorted
    name order) of a state dict. Mirrors `formula_fill` in tests/parity.rs."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    wave = torch.sin(i * 0.73 + index * 1.3)
    if name.endswith("running_var"):
        values = 0.75 + 0.25 * wave
    elif name.endswith("running_mean") or name.endswith("bias"):
        values = 0.1 * wave
    elif len(shape) == 1:  # BatchNorm weight
        values = 1.0 + 0.2 * wave
    else:  # convolution or linear weight: Kaiming-like scale
        fan_in = n // shape[0]
        values = wave * math.sqrt(3.0) * math.sqrt(2.0 / fan_in)
    return values.reshape(shape).to(torch.float32)


def encoder(arch: str, stem: str) -> torch.nn.Module:
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = torch.nn.Identity()
    if stem == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    state = model.state_dict()
    names = sorted(k for k in state if not k.endswith("num_batches_tracked"))
    filled = {name: formula_fill(name, index, tuple(state[name].shape)) for index, name in enumerate(names)}
    model.load_state_dict(filled, strict=False)
    return model


def input_images(count: int, size: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(count, 3, size, size)


def resnet_fixtures():
    for arch in ["resnet18", "resnet50"]:
        for stem, size in [("imagenet", 64), ("cifar", 32)]:
            model = encoder(arch, stem).eval()
            x = input_images(2, size)
            with torch.no_grad():
                h = model(x)
            save_file({"x": x, "h": h.contiguous()}, OUT / f"{arch}_{stem}.safetensors")
    # BatchNorm in train mode: batch statistics for the output, running
    # statistics updated with momentum 0.1 and the unbiased variance.
    model = encoder("resnet18", "cifar").train()
    x = input_images(4, 16)
    with torch.no_grad():
        h = model(x)
    tensors = {"x": x, "h": h.contiguous()}
    for name, value in model.state_dict().items():
        if name.endswith("running_mean") or name.endswith("running_var"):
            tensors[name] = value.contiguous()
    save_file(tensors, OUT / "resnet18_cifar_train_step.safetensors")


def nt_xent(z, tau, normalize=True):
    """Eq. (1) of arXiv 2002.05709; rows i and i + N are a positive pair."""
    n = z.shape[0] // 2
    if normalize:
        z = F.normalize(z, dim=1)
    logits = z @ z.T / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def loss_fixtures():
    torch.manual_seed(1)
    base = torch.randn(8, 16, dtype=torch.float64)
    tensors = {}
    for dtype, suffix in [(torch.float64, "f64"), (torch.float32, "f32")]:
        for normalize, kind in [(True, "cosine"), (False, "dot")]:
            z = base.to(dtype).clone().requires_grad_(True)
            tau = 0.2 if normalize else 4.0
            loss = nt_xent(z, tau, normalize)
            loss.backward()
            tensors[f"z_{suffix}"] = z.detach()
            tensors[f"loss_{kind}_{suffix}"] = loss.detach().reshape(1)
            tensors[f"grad_{kind}_{suffix}"] = z.grad
    save_file(tensors, OUT / "nt_xent.safetensors")


def lars_step(params, grads, velocities, lr, weight_decay, momentum, eta):
    """One update of the paper's LARS (tf2/lars_optimizer.py, classic
    momentum); 1-D parameters are excluded from decay and adaptation."""
    for name in params:
        w, g, v = params[name], grads[name].clone(), velocities[name]
        adapt = w.dim() > 1
        if adapt:
            g = g + weight_decay * w
            w_norm, g_norm = w.norm(), g.norm()
            trust = eta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else torch.tensor(1.0)
            scaled_lr = lr * trust
        else:
            scaled_lr = lr
        v.mul_(momentum).add_(scaled_lr * g)
        w.sub_(v)


def optimizer_fixtures():
    torch.manual_seed(2)
    initial = {"weight": torch.randn(6, 5), "bias": torch.randn(6)}
    grads = [{k: torch.randn_like(v) for k, v in initial.items()} for _ in range(2)]
    tensors = {f"initial.{k}": v for k, v in initial.items()}
    for step, grad in enumerate(grads):
        tensors.update({f"grad{step}.{k}": v for k, v in grad.items()})
    hyper = dict(lr=0.5, weight_decay=1e-2, momentum=0.9)

    params = {k: v.clone() for k, v in initial.items()}
    velocities = {k: torch.zeros_like(v) for k, v in initial.items()}
    for step, grad in enumerate(grads):
        lars_step(params, grad, velocities, eta=0.001, **hyper)
        tensors.update({f"lars{step}.{k}": v.clone() for k, v in params.items()})

    # PyTorch's own SGD and AdamW, decay on the 2-D weight only.
    for name, make in [
        ("sgd", lambda groups: torch.optim.SGD(groups, lr=hyper["lr"], momentum=hyper["momentum"])),
        ("adamw", lambda groups: torch.optim.AdamW(groups, lr=hyper["lr"] * 0.01)),
    ]:
        params = {k: v.clone().requires_grad_(True) for k, v in initial.items()}
        groups = [
            {"params": [params["weight"]], "weight_decay": hyper["weight_decay"]},
            {"params": [params["bias"]], "weight_decay": 0.0},
        ]
        optimizer = make(groups)
        for step, grad in enumerate(grads):
            for k, p in params.items():
                p.grad = grad[k].clone()
            optimizer.step()
            tensors.update({f"{name}{step}.{k}": v.detach().clone() for k, v in params.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "optimizers.safetensors")


def knn_votes(bank, bank_labels, queries, classes, k=200, temperature=0.1):
    """The weighted kNN monitor of Wu et al. 2018 (arXiv 1805.01978), as
    solo-learn and most SSL code bases compute it."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    similarity, index = (queries @ bank.T).topk(k, dim=1)
    weights = (similarity / temperature).exp()
    one_hot = F.one_hot(bank_labels[index], classes).to(weights.dtype)
    return (one_hot * weights.unsqueeze(-1)).sum(dim=1)


def eval_fixtures():
    """A small labelled feature set with overlapping classes, and the
    accuracies that references reach on it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(3)
    classes, dim = 10, 32
    centres = torch.randn(classes, dim) * 1.2
    train_labels = torch.arange(2000) % classes
    test_labels = torch.arange(1000) % classes
    # A non-isotropic scale per dimension, so standardisation matters.
    scale = torch.linspace(0.1, 10.0, dim)
    train = (centres[train_labels] + torch.randn(2000, dim) * 3.0) * scale
    test = (centres[test_labels] + torch.randn(1000, dim) * 3.0) * scale
    votes = knn_votes(train, train_labels, test, classes)
    knn_top1 = (votes.argmax(1) == test_labels).double().mean()
    knn_top5 = (votes.topk(5, dim=1).indices == test_labels[:, None]).any(1).double().mean()

    scaler = StandardScaler().fit(train.numpy())
    regression = LogisticRegression(C=1e4, max_iter=10000).fit(scaler.transform(train.numpy()), train_labels.numpy())
    linear_top1 = regression.score(scaler.transform(test.numpy()), test_labels.numpy())
    save_file(
        {
            "train": train,
            "train_labels": train_labels,
            "test": test,
            "test_labels": test_labels,
            "knn_votes": votes,
            "knn_top1": knn_top1.reshape(1),
            "knn_top5": knn_top5.reshape(1),
            "linear_top1": torch.tensor([linear_top1], dtype=torch.float64),
        },
        OUT / "eval.safetensors",
    )
    print(f"reference kNN top-1 {knn_top1:.4f} top-5 {knn_top5:.4f}, logistic regression top-1 {linear_top1:.4f}")


def main():
    """All fixtures, or those named: python3 tools/make_fixtures.py eval."""
    import sys

    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    makers = {"resnet": resnet_fixtures, "loss": loss_fixtures, "optimizer": optimizer_fixtures, "eval": eval_fixtures}
    for name in sys.argv[1:] or makers:
        makers[name]()
    for path in sorted(OUT.glob("*.safetensors")):
        print(f"{path.relative_to(OUT.parent.parent.parent.parent)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
