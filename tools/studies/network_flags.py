"""The flags that build a run's network and centre views for `simclr eval`
(architecture, width, stem, image size, normalisation), read from the run's
config.toml: what the studies give `--random-init` so that the random-init
floor is the runs' own network untrained.

    tools/studies/network_flags.py RUN/config.toml
"""
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    config = tomllib.load(file)
model, data = config["model"], config["data"]
print(f"--arch {model['arch']} --width {model['width_multiplier']} --stem {model['stem']}",
      f"--image-size {data['image_size']} --mean {','.join(map(str, data['mean']))}",
      f"--std {','.join(map(str, data['std']))}")
