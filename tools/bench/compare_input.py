#!/usr/bin/env python3
"""Reads `ours theirs` JSON pairs (one pair per line) from bench_input.sh and
prints each pair, the median ratio and where one image's time goes."""
import json
import statistics
import sys

pairs = [tuple(json.loads(part) for part in line.split(" ", 1)) for line in sys.stdin if line.strip()]
ratios = []
for ours, theirs in pairs:
    a, b = ours["images_per_second"], theirs["images_per_second"]
    ratios.append(a / b)
    print(f"ours {a:7.1f} images/s   torchvision {b:7.1f} images/s   {a / b:.2f}x")
stages = pairs[0][0]["stages"]
print(
    f"median ratio {statistics.median(ratios):.2f}x over {len(ratios)} pairs; "
    f"reading and decoding {100 * pairs[0][0]['decode_share']:.0f}% of one image on one thread "
    f"(read {stages['read_ms']:.2f} ms, decode {stages['decode_ms']:.2f} ms, "
    f"crop and resize {stages['geometry_ms']:.2f} ms, pixel ops {stages['pixels_ms']:.2f} ms)"
)
