"""The logits mask of grammar-constrained requests (``Req.grammar``, pymllm.orchestrator.grammar)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pymllm.orchestrator.grammar import xgrammar_module


def allowed_token_mask(matchers: Sequence[Optional[object]], vocab_size: int,
                       device: torch.device | str) -> Optional[torch.Tensor]:
    """[B, V] bool: the tokens each row's matcher allows next (every token for rows without one);
    None when no row has a matcher."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    xgr = xgrammar_module()
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)  # int32 words, all bits set
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    # The packed words cross to the device (1/8 of the bool mask's bytes) and are unpacked there.
    # Through pinned memory the copy does not wait for the forward still running on the stream.
    device = torch.device(device)
    if device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(len(matchers), -1)[:, :vocab_size]
