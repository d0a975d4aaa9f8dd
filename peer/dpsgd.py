"""One DP-SGD gradient: per-example gradients of the LoRA factors, clipped, summed and noised.

Per-example gradients come from `torch.func` (`vmap` over `grad` of a `functional_call` that
swaps in only this adapter's factors): the frozen base is shared, so an in-process simulation's
peers each get their own adapter's gradients without hooks left on the model. Measured against
Opacus's GradSampleModule on the same batch (README, "Private by measurement").

Each example's loss is the mean over its own labelled tokens, so its gradient depends on it
alone; the clipped sum plus N(0, σ²C²) noise is divided by the expected batch size q·N, as
DP-SGD with Poisson sampling prescribes (Opacus's `expected_batch_size`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from peer.data import IGNORE_INDEX

Grads = dict[str, torch.Tensor]


def per_example_grads(model: torch.nn.Module, params: Mapping[str, torch.Tensor],
                      batch: Mapping[str, torch.Tensor]) -> tuple[Grads, torch.Tensor]:
    """Each example's gradient of its mean token loss w.r.t. `params`, and those losses.

    Rows are right-padded: under causal attention a row's real tokens never see its padding,
    so no attention mask is passed (its construction does not vmap) and pads only lose their
    labels.

    Args:
        params: the trainable factors by their full module names (detached).
        batch: `input_ids` and `labels` of shape (B, T).

    Returns:
        ({name: (B, *shape)}, losses of shape (B,)).
    """

    def loss_of(weights: Mapping[str, torch.Tensor], ids: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, dict(weights), (), {"input_ids": ids[None]}).logits
        loss = F.cross_entropy(logits[0, :-1].float(), labels[1:], ignore_index=IGNORE_INDEX)
        return loss, loss.detach()

    grads, losses = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0),
                         randomness="different")(dict(params), batch["input_ids"],
                                                 batch["labels"])
    return grads, losses


def clip_rows(grads: Grads, clip: float) -> Grads:
    """Scale each example's gradient (all tensors together) to norm at most `clip`."""
    norms = per_example_norms(grads)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {name: g * scale.view(-1, *([1] * (g.dim() - 1))) for name, g in grads.items()}


def per_example_norms(grads: Grads) -> torch.Tensor:
    """The L2 norm of each example's whole gradient, shape (B,)."""
    squares = [g.flatten(1).pow(2).sum(dim=1) for g in grads.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def noisy_mean(clipped_sum: Mapping[str, torch.Tensor], *, noise: float, clip: float,
               expected_batch: float, generator: torch.Generator | None = None) -> Grads:
    """(Σ clipped gradients + N(0, σ²C²)) / expected batch size: the private gradient."""
    # Drawn on the CPU, where `generator` lives, then moved beside the gradient.
    return {name: (total + torch.normal(0.0, noise * clip, total.shape, generator=generator)
                   .to(total.device, total.dtype)) / expected_batch
            for name, total in clipped_sum.items()}
