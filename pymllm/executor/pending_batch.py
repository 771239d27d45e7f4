"""A batch whose GPU work is enqueued but whose sampled tokens have not reached the host yet.

Overlapped decoding (``Scheduler(overlap=True)``) launches step n+1 before it reads step n's
tokens: step n+1 takes its input tokens from step n's ids on the device, and the host waits
for step n alone (an event recorded after its ids were copied into pinned memory), not for the
whole stream. So the host's work between two steps (reading the tokens, stop checks, streaming
them out, scheduling and packing the next step) runs while the GPU computes, instead of
leaving the GPU idle between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from pymllm.orchestrator.schedule_batch import BatchResult, ScheduledBatch


@dataclass
class PendingBatch:
    batch: ScheduledBatch
    device_ids: torch.Tensor  # [bs] int64 on the device: the sampled tokens, inputs of a follower
    host_ids: torch.Tensor  # [bs] int64 on the host (pinned on CUDA), filled by the copy
    done: Optional[torch.cuda.Event]  # recorded after the copies; None on the CPU
    # Host copies of the sampler's (chosen logprob [bs], top ids [bs, k], top values [bs, k]),
    # None when no request asked for logprobs.
    logprob_parts: Optional[Sequence[Optional[torch.Tensor]]] = None
    # Per request, the prompt tokens the batch scored (already on the host), or None.
    prompt_logprobs: Optional[List[list]] = None


class Readback:
    """Copies sampled ids (and logprobs) of a launched batch to the host without waiting.

    The ids go into a ring of pinned rows, one per batch that can be in flight at once (a step
    and the one launched behind it; three leave a spare), so a later launch never writes the row
    of a batch whose ids the host has not read yet. A decode graph's argmax can write its row
    itself (``reserve`` a row before the launch, ``mirrored`` after it): then no copy is queued
    between that step and the next. Row 0 is the graphs' scratch row, which the launches that
    reserved none write and nobody reads. On the CPU the ids are already on the host.
    """

    DEPTH = 3

    def __init__(self, max_rows: int, device: torch.device):
        self._on_cuda = device.type == "cuda"
        self.ring = torch.zeros(self.DEPTH + 1, max_rows, dtype=torch.int64, pin_memory=self._on_cuda)
        self._events = [torch.cuda.Event() if self._on_cuda else None for _ in range(self.DEPTH + 1)]
        self._next = 0

    def reserve(self) -> int:
        """The ring row of the next batch to read back (1..DEPTH; never the scratch row 0)."""
        slot = 1 + self._next
        self._next = (self._next + 1) % self.DEPTH
        return slot

    def start(self, ids: torch.Tensor, extra: Sequence[Optional[torch.Tensor]] = (), slot: Optional[int] = None,
              ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], Optional[torch.cuda.Event]]:
        """(host ids, host copies of ``extra``, event marking their arrival); ``slot``: a row
        reserved for this batch (else the next one)."""
        if not self._on_cuda:
            return ids, list(extra), None
        n = ids.numel()
        slot = self.reserve() if slot is None else slot
        if n <= self.ring.shape[1]:
            host = self.ring[slot, :n]
            host.copy_(ids, non_blocking=True)
        else:  # more rows than any decode batch: a pinned buffer of its own
            host = ids.to("cpu", non_blocking=True)
        # A non-blocking copy to the CPU lands in pinned memory, so it does not wait either.
        copies = [t.to("cpu", non_blocking=True) if t is not None else None for t in extra]
        event = self._events[slot]
        event.record()
        return host, copies, event

    def mirrored(self, slot: int, n: int) -> Tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        """(host ids, event) of a batch whose kernel writes ``n`` ids into ring row ``slot`` itself:
        the event, recorded now behind that kernel, marks their arrival."""
        host = self.ring[slot, :n]
        event = self._events[slot]
        if event is not None:
            event.record()
        return host, event


def collect(pending: PendingBatch) -> BatchResult:
    """Wait for one launched batch's copies and return its tokens (and logprobs) as Python values."""
    if pending.done is not None:
        pending.done.synchronize()
    next_ids = pending.host_ids.tolist()
    logprobs: List[Optional[tuple]] = [None] * len(next_ids)
    if pending.logprob_parts is not None:
        chosen_t, top_ids_t, top_vals_t = pending.logprob_parts
        chosen = chosen_t.tolist()
        top_ids = top_ids_t.tolist() if top_ids_t is not None else None
        top_vals = top_vals_t.tolist() if top_vals_t is not None else None
        for i, req in enumerate(pending.batch.reqs):
            if not req.sampling_params.logprobs:
                continue
            k = req.sampling_params.top_logprobs
            top = list(zip(top_ids[i][:k], top_vals[i][:k])) if top_ids is not None and k else []
            logprobs[i] = (next_ids[i], chosen[i], top)
    return BatchResult(next_token_ids=next_ids, logprobs=logprobs, prompt_logprobs=pending.prompt_logprobs)
