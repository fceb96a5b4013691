#!/usr/bin/env python3
"""Reads a run's metrics.tfevents with TensorBoard's own reader and checks
it against the run's metrics.jsonl: every epoch's scalars, at its step and
time, once each; the steps' loss and learning rate at every
train.log_every_steps-th step once each (but skipped steps), and with every
step logged, each epoch's mean of them its logged loss (run by hand, the
venv of tools/python.sh):

    "$(tools/python.sh)" tools/reference/check_tensorboard.py RUN_FOLDER

Prints what TensorBoard sees; exits 1 on any difference.
"""
import json
import math
import pathlib
import struct
import sys
import tomllib

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def as_float32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


def expected_scalars(entry):
    seconds = entry["seconds"]
    scalars = {
        "train/loss": entry["loss"],
        "train/learning_rate": entry["learning_rate"],
        "train/epoch": entry["epoch"],
        "train/images_per_second": entry["images_per_second"],
        "train/data_wait_fraction": entry["data_wait_seconds"] / seconds if seconds > 0 else 0.0,
    }
    if "knn_top1" in entry:
        scalars["monitor/knn_top1"] = entry["knn_top1"]
    return scalars


STEP_TAGS = ("train/loss_step", "train/learning_rate_step")


def step_problems(run, entries, seen):
    """What differs in the steps' scalars from what the run logged."""
    every = tomllib.loads((run / "config.toml").read_text())["train"].get("log_every_steps", 10)
    last = entries[-1]["step"] if entries else 0
    summary = run / "summary.json"
    skipped = json.loads(summary.read_text()).get("skipped_steps", 0) if summary.exists() else 0
    wanted = list(range(every, last + 1, every)) if every > 0 else []
    problems = []
    for tag in STEP_TAGS:
        steps = [event.step for event in seen.get(tag, [])]
        print(f"{tag}: {len(steps)} points, every {every} steps up to step {last}")
        if len(set(steps)) != len(steps) or steps != sorted(steps):
            problems.append(f"{tag}: steps repeated or out of order")
        if not set(steps) <= set(wanted) or len(steps) < len(wanted) - skipped:
            problems.append(f"{tag}: steps {steps}, wanted every {every} up to {last} but {skipped} skipped")
    if every == 1 and skipped == 0:
        losses = {event.step: event.value for event in seen.get("train/loss_step", [])}
        first = 1
        for entry in entries:
            epoch = [losses[step] for step in range(first, entry["step"] + 1) if step in losses]
            mean = sum(epoch) / len(epoch) if epoch else float("nan")
            if not math.isclose(mean, entry["loss"], rel_tol=1e-5):
                problems.append(f"epoch {entry['epoch']}: its steps' mean loss {mean}, logged {entry['loss']}")
            first = entry["step"] + 1
    return problems


def main() -> int:
    run = pathlib.Path(sys.argv[1])
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    accumulator = EventAccumulator(str(run / "metrics.tfevents"), size_guidance={"scalars": 0})
    accumulator.Reload()
    seen = {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
    problems = step_problems(run, entries, seen)
    wanted = {}
    for entry in entries:
        for tag, value in expected_scalars(entry).items():
            wanted.setdefault(tag, []).append((entry["step"], as_float32(value), entry.get("wall_time")))
    for tag in sorted((set(seen) | set(wanted)) - set(STEP_TAGS)):
        got = [(event.step, event.value, event.wall_time) for event in seen.get(tag, [])]
        print(f"{tag}: {len(got)} points, steps {[step for step, _, _ in got]}")
        if len(got) != len(wanted.get(tag, [])):
            problems.append(f"{tag}: {len(got)} points, metrics.jsonl has {len(wanted.get(tag, []))}")
            continue
        for (step, value, wall_time), (want_step, want_value, want_time) in zip(got, wanted[tag]):
            same_value = value == want_value or (math.isnan(value) and math.isnan(want_value))
            if step != want_step or not same_value or (want_time is not None and wall_time != want_time):
                problems.append(f"{tag}: ({step}, {value}, {wall_time}) where ({want_step}, {want_value}, {want_time})")
    for problem in problems:
        print("differs:", problem)
    print("the events are metrics.jsonl's and the steps'" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
