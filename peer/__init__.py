"""The loraswarm peer daemon: config, CLI, model and data loading, training, persistence."""

import logging
import warnings

# bitsandbytes (the optional 4-bit extra) warns at import time, which peft triggers whenever it
# is installed, that an optional CPU kernel package is missing: noise on every `--help`, about a
# kernel a peer never uses (4-bit bases need CUDA here).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Two warnings every DP or LoRA peer would print, about costs measured and accepted:
# - torch's vmap has no batching rule for CPU flash attention (forward or backward), so a DP
#   step's per-example gradients loop over the examples there: measured at 1.2-1.3 times a
#   plain step's time at batch 8 (README, "Per-example gradients: torch.func").
# - peft reads transformers' `is_gradient_checkpointing`, deprecated in transformers 5.
warnings.filterwarnings("ignore", category=UserWarning,
                        message="There is a performance drop because we have not yet "
                        "implemented the batching rule")
warnings.filterwarnings("ignore", category=FutureWarning,
                        message="`is_gradient_checkpointing` is deprecated")
