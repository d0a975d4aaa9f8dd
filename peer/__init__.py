"""The loraswarm peer daemon: config, CLI, model and data loading, training, persistence."""

import logging

# bitsandbytes (the optional 4-bit extra) warns at import time, which peft triggers whenever it
# is installed, that an optional CPU kernel package is missing: noise on every `--help`, about a
# kernel a peer never uses (4-bit bases need CUDA here).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
