"""Pure merge rules over LoRA adapter states: no network, no trio, only torch.

Import from the submodules (`merge.rules`, `merge.config`, ...): this file imports nothing, so
that `merge.config` loads without torch and `loraswarm --help` answers at once.
"""
