"""The ``grad`` statistic: weight gradients of the language-modelling loss on calibration data.

First-order (Taylor) importance, as in LLM-Pruner, scores a weight by ``|W * dL/dW|``. The
gradient needs a backward pass through the whole model, so it is collected once, before the
sequential block pass, for every layer a stage asks it for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.model.modules import get_weight

log = logging.getLogger(__name__)


def collect_gradients(
    model: nn.Module,
    ids: torch.Tensor,
    names: Sequence[str],
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``dL/dW`` [out, in] (float32, on CPU) of each named layer, summed over batches of ``ids``.

    The loss is the model's causal-LM loss (``labels=input_ids``), summed over tokens. Only
    the named layers' weights require gradients; the model's parameters are left as found.
    """
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    wanted = {n: get_weight(model.get_submodule(n)) for n in names}
    grads = {n: torch.zeros(w.shape, dtype=torch.float32) for n, w in wanted.items()}  # [out, in]
    home = next(model.parameters()).device
    was_training = model.training
    try:
        for p in params.values():
            p.requires_grad_(False)
        for n in names:
            model.get_submodule(n).weight.requires_grad_(True)
        model.to(device)
        model.eval()
        for batch in tqdm(ids.split(batch_size), desc="gradients", disable=not progress):
            batch = batch.to(device)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            (out.loss * (batch.shape[0] * (batch.shape[1] - 1))).backward()  # sum over predictions
            for n in names:
                w = model.get_submodule(n).weight
                assert isinstance(w, torch.Tensor) and w.grad is not None, n
                g = w.grad.t() if w.grad.shape != wanted[n].shape else w.grad  # Conv1D: [in, out]
                grads[n] += g.detach().float().cpu()
                w.grad = None
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        model.to(home)
        model.train(was_training)
    log.info("collected gradients of %d layers on %d sequences", len(grads), ids.shape[0])
    return grads
