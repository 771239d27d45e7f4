"""Vectorised token sampling for a batch of requests.

Every step works on the whole ``[B, V]`` logits tensor at once; per-request settings live in
``[B]`` tensors so one batch mixes greedy, filtered and penalised requests without a Python
loop. Sampling noise comes from a counter-based hash of (seed, step, token id), so a seeded
request draws the same tokens whatever batch it runs in and at whatever row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from pymllm.layers.fused_ops import row_logsumexp
from pymllm.sampling_params import SamplingParams

# Matches SamplingParams.is_greedy: temperatures this small are treated as argmax.
_GREEDY_TEMPERATURE = 1e-5
# Up to this top_k, a partial top-k selection is cheaper than sorting the whole vocabulary.
_TOP_K_CANDIDATE_LIMIT = 1024


def _signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit constant as the signed value torch.int64 stores."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX_MUL_1 = _signed64(0xBF58476D1CE4E5B9)
_MIX_MUL_2 = _signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    # int64 >> is arithmetic; masking off the sign-extended bits makes it a logical shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    x = (x ^ _shr(x, 30)) * _MIX_MUL_1
    x = (x ^ _shr(x, 27)) * _MIX_MUL_2
    return x ^ _shr(x, 31)


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1) for each (row, token), a pure function of (seed, step, token id).

    ``token_ids`` is [V] (the same ids for every row) or [B, K]; the result broadcasts to
    [B, V] or [B, K]. Built from the top 52 hash bits converted straight to float32, so values
    close to 0 keep full float32 relative precision: the exponential race is decided there.
    """
    row_key = _mix64(_mix64(seeds.to(torch.int64) + _GOLDEN) ^ steps.to(torch.int64))
    counters = (token_ids.to(torch.int64) + 1) * _GOLDEN
    if counters.dim() == 1:
        counters = counters.unsqueeze(0)
    bits = _shr(_mix64(row_key.unsqueeze(1) + counters), 12)
    # +0.5 keeps u > 0; float32 rounding may reach 1.0, which the clamp pulls back below 1.
    u = (bits.to(torch.float32) + 0.5) * (2.0 ** -52)
    return u.clamp_(max=1.0 - 2.0 ** -24)


def _gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """-log(E) with E ~ Exp(1): argmax(z + noise) samples softmax(z) (exponential race)."""
    exp_noise = -torch.log1p(-hash_uniform(seeds, steps, token_ids))
    return -torch.log(exp_noise)


@dataclass
class SamplingBatchInfo:
    temperatures: torch.Tensor  # [B] float32
    top_ps: torch.Tensor  # [B] float32
    top_ks: torch.Tensor  # [B] int64, vocab size where disabled
    min_ps: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the token being sampled
    repetition_penalties: Optional[torch.Tensor]  # [B] float32, None when no request uses it
    presence_penalties: Optional[torch.Tensor]  # [B] float32, None when no request uses it
    frequency_penalties: Optional[torch.Tensor]  # [B] float32, None when no request uses it
    token_counts: Optional[torch.Tensor]  # [B, V] float32 counts of output tokens
    seen_mask: Optional[torch.Tensor]  # [B, V] bool: token in prompt or output
    is_all_greedy: bool
    need_top_p: bool
    need_top_k: bool
    need_min_p: bool
    top_logprobs_num: int
    return_logprob: bool
    # Largest top_k among the sampled (non-greedy) rows, known on the host; 0 when unknown or
    # when some sampled row has top-k disabled. Lets the sampler skip the full vocabulary sort.
    max_top_k: int = 0
    logit_biases: Optional[torch.Tensor] = None  # [B, V] float32 added to the logits; None when unused
    # [B, V] bool: the only tokens a row may take (a grammar's next tokens); None when unused
    allowed_tokens: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.temperatures.shape[0])

    @property
    def need_penalties(self) -> bool:
        return (
            self.repetition_penalties is not None
            or self.presence_penalties is not None
            or self.frequency_penalties is not None
        )

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        prompt_ids: Optional[Sequence[Sequence[int]]] = None,
        output_ids: Optional[Sequence[Sequence[int]]] = None,
        in_flight_ids: Optional[torch.Tensor] = None,
    ) -> "SamplingBatchInfo":
        """Build the batch tensors from ``with_defaults()``-applied params.

        ``vocab_size`` must equal the logits width (including any padded lm_head rows), since
        the penalty tensors are applied elementwise to the logits. ``in_flight_ids`` ([B] on the
        device): each row's output token that ``output_ids`` does not hold yet (the previous
        step's, still in flight under overlapped decoding); the penalties count it too.
        """
        batch = len(params)
        if len(seeds) != batch or len(steps) != batch:
            raise ValueError("params, seeds and steps must have the same length")

        top_ks = [vocab_size if p.top_k is None or p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        sampled = [p for p in params if not p.is_greedy]
        sampled_top_ks = [k for k, p in zip(top_ks, params) if not p.is_greedy]
        rep = [p.repetition_penalty if p.repetition_penalty is not None else 1.0 for p in params]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        use_rep = any(r != 1.0 for r in rep)
        use_presence = any(v != 0.0 for v in presence)
        use_frequency = any(v != 0.0 for v in frequency)
        # One host-to-device copy for the float rows and one for the int rows, instead of one
        # per tensor; the tensors are row views of the two.
        float_rows = [[float(p.temperature) for p in params], [float(p.top_p) for p in params],
                      [float(p.min_p) for p in params]]
        optional_rows = [(use_rep, rep), (use_presence, presence), (use_frequency, frequency)]
        float_rows += [values for used, values in optional_rows if used]
        floats = _to_device(np.asarray(float_rows, dtype=np.float32).reshape(len(float_rows), batch), device)
        ints = _to_device(
            np.asarray([top_ks, [_signed64(int(s)) for s in seeds], [int(s) for s in steps]],
                       dtype=np.int64).reshape(3, batch),
            device,
        )
        optional = iter(floats[3:])
        penalties = [next(optional) if used else None for used, _ in optional_rows]

        token_counts = None
        if use_presence or use_frequency:
            token_counts = _count_tokens(output_ids, batch, vocab_size, device, in_flight_ids)
        seen_mask = None
        if use_rep:
            seen = [list(prompt_ids[i]) if prompt_ids is not None else [] for i in range(batch)]
            if output_ids is not None:
                for i in range(batch):
                    seen[i].extend(output_ids[i])
            seen_mask = _count_tokens(seen, batch, vocab_size, device, in_flight_ids) > 0

        top_logprobs_num = max((p.top_logprobs for p in params), default=0)
        return cls(
            logit_biases=_bias_rows(params, vocab_size, device),
            temperatures=floats[0],
            top_ps=floats[1],
            top_ks=ints[0],
            min_ps=floats[2],
            seeds=ints[1],
            steps=ints[2],
            repetition_penalties=penalties[0],
            presence_penalties=penalties[1],
            frequency_penalties=penalties[2],
            token_counts=token_counts,
            seen_mask=seen_mask,
            is_all_greedy=not sampled,
            # Filters matter only for sampled rows; greedy rows take the argmax regardless.
            need_top_p=any(p.top_p < 1.0 for p in sampled),
            need_top_k=any(k < vocab_size for k in sampled_top_ks),
            need_min_p=any(p.min_p > 0.0 for p in sampled),
            top_logprobs_num=top_logprobs_num,
            return_logprob=top_logprobs_num > 0 or any(p.logprobs for p in params),
            max_top_k=max(sampled_top_ks) if sampled_top_ks and max(sampled_top_ks) < vocab_size else 0,
        )


def _to_device(values: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """One copy of a host array to the device; through pinned memory on CUDA, so the copy is
    asynchronous (PyTorch's pinned-memory cache keeps the block until the copy is done)."""
    host = torch.from_numpy(values)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _bias_rows(params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str) -> Optional[torch.Tensor]:
    """[B, V] float32 logit biases, or None when no request has one. The tokenizer process
    refuses ids outside the tokenizer's vocabulary; ids of it past the logits' width (a tokenizer
    larger than the LM head) name tokens the model cannot produce, so their bias is moot."""
    if not any(p.logit_bias for p in params):
        return None
    entries = [(i, t, v) for i, p in enumerate(params) for t, v in p.logit_bias.items() if t < vocab_size]
    rows, cols, values = ([e[k] for e in entries] for k in range(3))
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    index = (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64, device=device))
    bias[index] = torch.tensor(values, dtype=torch.float32, device=device)
    return bias


def is_plain_greedy(params: Sequence[SamplingParams]) -> bool:
    """True when every request takes the argmax of its raw logits: greedy, no penalties, no
    logit bias, no logprobs. Such a batch needs no SamplingBatchInfo at all."""
    return not any(p.needs_sampler for p in params)


def _count_tokens(
    ids: Optional[Sequence[Sequence[int]]], batch: int, vocab_size: int, device: torch.device | str,
    in_flight_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[batch, vocab] float32 counts of each row's ``ids``, plus one per row for its
    ``in_flight_ids`` token (on the device: no read-back)."""
    counts = torch.zeros(batch, vocab_size, dtype=torch.float32, device=device)
    if ids is not None:
        rows = [i for i, seq in enumerate(ids) for _ in seq]
        cols = [t for seq in ids for t in seq]
        if rows:
            index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            counts.index_put_(index, torch.ones(len(rows), device=device), accumulate=True)
    if in_flight_ids is not None:
        index = (torch.arange(batch, device=device), in_flight_ids.to(device=device, dtype=torch.int64))
        counts.index_put_(index, torch.ones(batch, device=device), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Repetition (HF/CTRL), then frequency and presence (OpenAI) penalties; float32 result."""
    out = logits.float()
    if info.repetition_penalties is not None:
        assert info.seen_mask is not None
        penalty = info.repetition_penalties.unsqueeze(1)
        penalised = torch.where(out > 0, out / penalty, out * penalty)
        out = torch.where(info.seen_mask, penalised, out)
    if info.frequency_penalties is not None or info.presence_penalties is not None:
        assert info.token_counts is not None
        counts = info.token_counts
        if info.frequency_penalties is not None:
            out = out - info.frequency_penalties.unsqueeze(1) * counts
        if info.presence_penalties is not None:
            out = out - info.presence_penalties.unsqueeze(1) * (counts > 0).float()
    return out


def _filter_sorted(sorted_z: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Apply top-k, then top-p, then min-p to descending-sorted scaled logits (-inf = dropped).

    ``sorted_z`` may hold only each row's leading candidates: every filter depends on the
    surviving tokens alone, so a truncated list that still covers top_k gives the same result.
    """
    neg_inf = float("-inf")
    rank = torch.arange(sorted_z.shape[1], device=sorted_z.device).unsqueeze(0)
    if info.need_top_k:
        sorted_z = sorted_z.masked_fill(rank >= info.top_ks.unsqueeze(1), neg_inf)
    if info.need_top_p:
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # A token survives while the mass ranked above it is still short of top_p; the top
        # token always survives. Rows with top_p == 1 are exempt: float32 cumsum can reach 1.0
        # early and would otherwise cut tail tokens depending on batch companions.
        top_ps = info.top_ps.unsqueeze(1)
        drop = (mass_before >= top_ps) & (rank > 0) & (top_ps < 1.0)
        sorted_z = sorted_z.masked_fill(drop, neg_inf)
    return _apply_min_p(sorted_z, sorted_z[:, :1], info) if info.need_min_p else sorted_z


def _apply_min_p(z: torch.Tensor, z_max: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    # p_i < min_p * p_max  <=>  z_i < z_max + log(min_p): renormalisation cancels out.
    threshold = z_max + torch.log(info.min_ps.unsqueeze(1))
    return z.masked_fill(z < threshold, float("-inf"))


def _sample(z: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Draw one token per row from softmax(z) after filtering; z is temperature-scaled."""
    if not (info.need_top_k or info.need_top_p):
        if info.need_min_p:
            z = _apply_min_p(z, z.max(dim=-1, keepdim=True).values, info)
        vocab_ids = torch.arange(z.shape[1], device=z.device)
        return torch.argmax(z + _gumbel_noise(info.seeds, info.steps, vocab_ids), dim=-1)
    if 0 < info.max_top_k <= _TOP_K_CANDIDATE_LIMIT and info.max_top_k < z.shape[1]:
        # Every sampled row keeps at most max_top_k tokens, so a partial top-k replaces the full
        # vocabulary sort and the rest of the work shrinks to [B, max_top_k].
        cand_z, cand_ids = torch.topk(z, info.max_top_k, dim=-1)
    else:
        cand_z, cand_ids = torch.sort(z, dim=-1, descending=True)
    cand_z = _filter_sorted(cand_z, info)
    # Noise is keyed by vocabulary id, not by rank, so the draw does not depend on which
    # candidate list (partial or full) the batch happened to use.
    pick = torch.argmax(cand_z + _gumbel_noise(info.seeds, info.steps, cand_ids), dim=-1)
    return cand_ids.gather(1, pick.unsqueeze(1)).squeeze(1)


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: Optional[torch.Tensor] = None  # [B] float32, chosen token under raw log_softmax
    top_logprob_ids: Optional[torch.Tensor] = None  # [B, K] int64
    top_logprob_vals: Optional[torch.Tensor] = None  # [B, K] float32


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SamplerOutput:
        logits = logits.float()
        penalised = apply_penalties(logits, info) if info.need_penalties else logits
        if info.logit_biases is not None:
            penalised = penalised + info.logit_biases
        if info.allowed_tokens is not None:
            penalised = penalised.masked_fill(~info.allowed_tokens, float("-inf"))
        greedy_ids = torch.argmax(penalised, dim=-1)
        if info.is_all_greedy:
            next_ids = greedy_ids
        else:
            greedy_rows = (info.temperatures <= _GREEDY_TEMPERATURE) | (info.top_ks == 1)
            # Greedy rows get a harmless temperature; their sample is replaced by argmax below.
            temps = torch.where(greedy_rows, torch.ones_like(info.temperatures), info.temperatures)
            sampled_ids = _sample(penalised / temps.unsqueeze(1), info)
            next_ids = torch.where(greedy_rows, greedy_ids, sampled_ids)

        out = SamplerOutput(next_token_ids=next_ids)
        if info.return_logprob:
            out.logprobs, out.top_logprob_vals, out.top_logprob_ids = raw_logprobs(
                logits, next_ids, info.top_logprobs_num)
        return out


def raw_logprobs(logits: torch.Tensor, ids: torch.Tensor, top_k: int
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(logprob of each row's ``ids`` [B], the ``top_k`` largest logprobs [B, k] and their ids, or
    None, None when top_k is 0) under log_softmax of the raw logits [B, V], in float32: what the
    sampler reports for generated tokens and prompt scoring for prompt tokens. log_softmax(x) =
    x - logsumexp(x) is taken only where it is read, and the logsumexp in one pass over
    model-dtype logits (``fused_ops.row_logsumexp``): the whole log_softmax would cost a pass more
    (prompt scoring of 2,048 Qwen3-8B rows on an H100: 9.06 against 4.41 ms, T158)."""
    lse = row_logsumexp(logits).unsqueeze(1)
    chosen = (logits.gather(1, ids.unsqueeze(1)).float() - lse).squeeze(1)
    if not top_k:
        return chosen, None, None
    vals, top_ids = torch.topk(logits, top_k, dim=-1)
    return chosen, vals.float() - lse, top_ids
