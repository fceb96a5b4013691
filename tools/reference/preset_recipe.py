#!/usr/bin/env python3
"""The recipe of a `simclr` config as train_pytorch.py's flags, so that a race
gives the reference the preset's own values rather than a second copy of
them that could drift.

Reads the TOML of `simclr train --preset P --print-config` on stdin and
prints `--loss O --temperature T --learning-rate L --weight-decay W --warmup-epochs E`,
`--min-scale M` (the random resized crop's), `--view-size S` where
`augment.view_size` is set, and `--fp32` where `train.mixed_precision` is off.
Stops, naming the field, where the config asks for what train_pytorch.py
does not do (it trains a ResNet-18 with the CIFAR stem and a 2-layer MLP
head to 128 without BatchNorm, runs NT-Xent or the decoupled loss with
cosine similarity, SGD with momentum 0.9 and the linear learning-rate
scaling, and makes both views with the paper's CIFAR pipeline, whose
crop's min_scale alone may differ).

    simclr train --preset cifar10-fast --print-config | python3 tools/reference/preset_recipe.py
"""
import functools
import sys
import tomllib

LOSSES = ("nt-xent", "dcl")
# What train_pytorch.py fixes, by the config's path to each field. Its head
# is Linear, ReLU, Linear to 128, no BatchNorm; the middle layer's width
# (`--hidden-dim`) and the network's (`--width`) are given by the caller.
REFERENCE = {
    ("model", "arch"): "resnet18",
    ("model", "stem"): "cifar",
    ("model", "head", "kind"): "mlp",
    ("model", "head", "layers"): 2,
    ("model", "head", "projection_dim"): 128,
    ("model", "head", "batch_norm"): False,
    ("loss", "similarity"): "cosine",
    ("optim", "optimizer"): "sgd",
    ("optim", "lr_scaling"): "linear",
    ("optim", "momentum"): 0.9,
}

# The views train_pytorch.py makes, op by op as `--print-config` writes them
# out: the `simclr-cifar` preset (appendix B.9), the crop's min_scale aside.
CIFAR_OPS = [
    {"op": "random-resized-crop", "max_scale": 1.0, "min_ratio": 0.75, "max_ratio": 4 / 3, "interpolation": "bilinear"},
    {"op": "horizontal-flip", "probability": 0.5},
    {"op": "color-jitter", "strength": 0.5, "probability": 0.8},
    {"op": "grayscale", "probability": 0.2},
]


def min_scale(augment: dict) -> float:
    """The crop's min_scale of the config's views; stops where they are not
    the ones train_pytorch.py makes."""
    if "second_view" in augment:
        sys.exit("preset_recipe.py: augment.second_view is set, but train_pytorch.py makes both views alike")
    if "ops" not in augment:
        if augment["preset"] != "simclr-cifar":
            sys.exit(f"preset_recipe.py: augment.preset = {augment['preset']!r}, but train_pytorch.py makes "
                     "'simclr-cifar' views")
        return 0.08
    ops = augment["ops"]
    names = [op["op"] for op in ops]
    if names != [op["op"] for op in CIFAR_OPS]:
        sys.exit(f"preset_recipe.py: augment.ops are {names}, but train_pytorch.py makes "
                 f"{[op['op'] for op in CIFAR_OPS]}")
    for op, expected in zip(ops, CIFAR_OPS):
        fields = {key: value for key, value in op.items() if key != "min_scale"}
        if fields != expected:
            sys.exit(f"preset_recipe.py: augment.ops has {op}, but train_pytorch.py makes {expected}")
    return ops[0]["min_scale"]


def main() -> None:
    config = tomllib.load(sys.stdin.buffer)
    objective = config["loss"]["objective"]
    if objective not in LOSSES:
        sys.exit(f"preset_recipe.py: loss.objective = {objective!r}, but train_pytorch.py runs one of {LOSSES}")
    for path, value in REFERENCE.items():
        given = functools.reduce(lambda section, key: section[key], path, config)
        if given != value:
            sys.exit(f"preset_recipe.py: {'.'.join(path)} = {given!r}, but train_pytorch.py runs {value!r}")
    optim = config["optim"]
    print(f"--loss {objective} --temperature {config['loss']['temperature']} --learning-rate {optim['learning_rate']} "
          f"--weight-decay {optim['weight_decay']} --warmup-epochs {optim['warmup_epochs']}"
          f" --min-scale {min_scale(config['augment'])}"
          + (f" --view-size {config['augment']['view_size']}" if "view_size" in config["augment"] else "")
          + ("" if config["train"]["mixed_precision"] else " --fp32"))


if __name__ == "__main__":
    main()
