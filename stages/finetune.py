"""The fine-tuning recipe for pretrained weights: fit the new head first, then the whole net.

1. The head (LP-FT, Kumar et al., ICLR 2022). The weights that `train.pretrained` did not
   provide are the new head: a linear layer for this dataset's classes. The backbone's
   features of every train and val image are computed once, in eval mode and without
   augmentation, and the head is fitted on them to convergence (L-BFGS, a convex problem)
   with the L2 penalty that gives the lowest val loss. Forward passes only: on a CPU a
   backbone runs about 8x faster forward than forward and backward, so this takes seconds
   and never runs backward through the backbone. The result is a linear probe, kept as
   epoch 0: the model the stage writes is the epoch with the lowest val loss, so the
   fine-tuning that follows replaces the probe only where it does better.
2. The whole net. Every weight trains from there at `train.backbone_lr` times `lr`, the
   fitted head included (train.param_groups; a head not fitted first trains at `lr`).
   Measured on EfficientNet-Lite0 (docs/training.md): a backbone lr of 0.005 wrecks the
   pretrained features in the first epoch, 0.001 keeps them. Starting from a fitted head,
   the first steps do not push large random-head gradients into the features (the point
   of LP-FT). Batch norm keeps its pretrained statistics
   (`train.freeze_bn`): a batch of a few dozen images estimates them worse than the
   millions of images they came from, and eval then sees other statistics than training.
"""

from __future__ import annotations

import time
from math import nan
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.models import MEMORY_FORMAT, autocast

# L2 penalties tried for the head, on the mean cross-entropy: from next to none to strong.
HEAD_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HEAD_ITERATIONS = 300
# The gradient norm fine-tuning clips to (train.clip_grad_norm: auto). A fitted head on
# pretrained features sits in a sharp spot: the first steps' gradient norms are 20 to 300, and
# unclipped SGD at lr 0.001 took EfficientNet-Lite0 on 32 px digits from val loss 0.39 to 2.5
# in one epoch; clipped at 1.0, the same lr lowered it to 0.29 in four (bench/finetune.py,
# docs/training.md).
FINE_TUNE_CLIP = 1.0


def new_head(model: nn.Module, new_keys: list[str]) -> nn.Linear | None:
    """The linear layer that holds every weight the pretrained file lacked, if that is all."""
    owners = {key.rsplit(".", 1)[0] for key in new_keys}
    if len(owners) != 1:
        return None
    module = model.get_submodule(owners.pop())
    own = {name for name, _ in module.named_parameters()}
    whole = {key.rsplit(".", 1)[1] for key in new_keys} == own
    fits = isinstance(module, nn.Linear) and module.bias is not None  # what fit_head sets
    return module if fits and whole else None


def split_parameters(model: nn.Module, head: nn.Module | None
                     ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained backbone parameters, head parameters)."""
    mine = {id(p) for p in head.parameters()} if head is not None else set()
    backbone = [p for p in model.parameters() if id(p) not in mine]
    return backbone, [p for p in model.parameters() if id(p) in mine]


def train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """model.train(), with batch norm left in eval mode (its statistics kept) if freeze_bn."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Module, loader: Any, device: torch.device,
                to_input: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """What `head` receives for every image of a loader (the features), and the labels."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(
        lambda _module, args, _out: captured.append(args[0].detach().float().cpu()))
    labels = []
    model.eval()
    try:
        for x, y in loader:
            with autocast(device):
                model(to_input(x).contiguous(memory_format=MEMORY_FORMAT))
            labels.append(y.cpu())
    finally:
        hook.remove()
    if not captured:
        return torch.empty(0, head.in_features), torch.empty(0, dtype=torch.long)
    return torch.cat(captured).flatten(1), torch.cat(labels)


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS: mean cross-entropy + l2/2 * |W|^2."""
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=HEAD_ITERATIONS, history_size=20,
                                  tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(x @ w.T + b, y, weight=weight) + 0.5 * l2 * w.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return w.detach(), b.detach()


def fit_head(head: nn.Linear, train: tuple[torch.Tensor, torch.Tensor],
             val: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor | None = None
             ) -> dict[str, float]:
    """Fit the head on cached features, its L2 penalty chosen by val loss; returns the scores,
    val's too (NaN without val images): the net's own in eval mode, without a second pass."""
    started = time.perf_counter()
    (x, y), (xv, yv) = train, val
    classes = head.out_features
    fits = {}
    for l2 in HEAD_L2 if len(yv) else (1e-3,):
        w, b = fit_linear(x, y, classes, l2, weight)
        fits[l2] = (w, b, F.cross_entropy(xv @ w.T + b, yv).item() if len(yv) else 0.0)
    l2 = min(fits, key=lambda k: fits[k][2])
    w, b, _ = fits[l2]
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    scores: dict[str, float] = {"head_l2": l2}
    for split, (features, labels) in (("train", train), ("val", val)):
        logits = features @ w.T + b
        scores[f"{split}_loss"] = F.cross_entropy(logits, labels).item() if len(labels) else nan
        scores[f"{split}_acc"] = ((logits.argmax(1) == labels).float().mean().item()
                                  if len(labels) else nan)
    return scores | {"seconds": time.perf_counter() - started}
