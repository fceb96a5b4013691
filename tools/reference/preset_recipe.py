#!/usr/bin/env python3
"""The recipe of a `simclr` config as train_pytorch.py's flags, so that a race
gives the reference the preset's own values rather than a second copy of
them that could drift.

Reads the TOML of `simclr train --preset P --print-config` on stdin and
prints `--loss O --temperature T --learning-rate L --weight-decay W --warmup-epochs E`,
`--view-size S` where `augment.view_size` is set, and `--fp32` where
`train.mixed_precision` is off.
Stops, naming the field, where the config asks for what train_pytorch.py
does not do (it runs NT-Xent or the decoupled loss with cosine similarity,
SGD with momentum 0.9 and the linear learning-rate scaling).

    simclr train --preset cifar10-fast --print-config | python3 tools/reference/preset_recipe.py
"""
import sys
import tomllib

LOSSES = ("nt-xent", "dcl")
REFERENCE = {
    ("loss", "similarity"): "cosine",
    ("optim", "optimizer"): "sgd",
    ("optim", "lr_scaling"): "linear",
    ("optim", "momentum"): 0.9,
}


def main() -> None:
    config = tomllib.load(sys.stdin.buffer)
    objective = config["loss"]["objective"]
    if objective not in LOSSES:
        sys.exit(f"preset_recipe.py: loss.objective = {objective!r}, but train_pytorch.py runs one of {LOSSES}")
    for (section, field), value in REFERENCE.items():
        if config[section][field] != value:
            sys.exit(f"preset_recipe.py: {section}.{field} = {config[section][field]!r}, "
                     f"but train_pytorch.py runs {value!r}")
    optim = config["optim"]
    print(f"--loss {objective} --temperature {config['loss']['temperature']} --learning-rate {optim['learning_rate']} "
          f"--weight-decay {optim['weight_decay']} --warmup-epochs {optim['warmup_epochs']}"
          + (f" --view-size {config['augment']['view_size']}" if "view_size" in config["augment"] else "")
          + ("" if config["train"]["mixed_precision"] else " --fp32"))


if __name__ == "__main__":
    main()
