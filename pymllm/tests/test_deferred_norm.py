"""The deferred RMSNorm's plumbing through the Llama-family decoder (pymllm.layers.deferred_norm),
on CPU: the layers' method is given a PyTorch producer and consumer (the W4A16 kernels' contract:
``w * h`` and partial sums of h^2 handed on, 1 / rms applied by the next projection), and the
decode steps at one row then run every norm deferred except the final norm (the first layer's
input norm produced by the embedding, ``VocabEmbedding.deferred_norm``) — with the same greedy
tokens as transformers. The kernels themselves are tested in
mllm-kernel/tests/test_w4a16_deferred_norm.py; the GPU model tests run the real pair."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from pymllm.layers.deferred_norm import ENV_SWITCH, DeferredNorm
from pymllm.layers.linear import UnquantizedLinearMethod
from pymllm.layers.vocab_embedding import VocabEmbedding
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests
from pymllm.tests.test_model_parity import hf_greedy

PROMPTS = [[5, 17, 300, 42, 7, 99, 12], [400, 2, 90]]
NEW_TOKENS = [6, 5]


def install_torch_deferred_norm(monkeypatch, calls: Counter, consumer_declines: bool = False) -> None:
    """Give unquantized layers a deferred norm in PyTorch, at one row, as WNA16Scheme has one."""

    def takes(self, layer, like, gated):
        return like.dim() == 2 and like.shape[0] == 1

    def add_norm(self, layer, x, residual, norm_weight, eps, bias):
        if x.dim() != 2 or x.shape[0] != 1:
            return None
        calls["produce"] += 1
        h = self.apply(layer, x, bias) + residual
        half = h.shape[1] // 2  # two partial sums, as tiles would give
        sumsq = torch.stack([h[0, :half].pow(2).sum(), h[0, half:].pow(2).sum()]).float()
        return DeferredNorm(norm_weight * h, h, sumsq, eps)

    def normed(self, layer, pending, bias, gated):
        calls["consume_gated" if gated else "consume"] += 1
        if consumer_declines:
            return None
        inv_rms = torch.rsqrt(pending.sumsq.sum() / pending.residual.shape[-1] + pending.eps)
        out = F.linear(pending.scaled, layer.weight) * inv_rms.to(pending.scaled.dtype)
        if bias is not None:
            out = out + bias
        if gated:
            gate, up = out.chunk(2, dim=-1)
            out = F.silu(gate) * up
        return out

    embed = VocabEmbedding.deferred_norm

    def embed_counted(self, input_ids, norm):
        calls["embed"] += 1
        return embed(self, input_ids, norm)

    monkeypatch.setattr(VocabEmbedding, "deferred_norm", embed_counted)
    monkeypatch.setattr(UnquantizedLinearMethod, "takes_deferred_norm", takes)
    monkeypatch.setattr(UnquantizedLinearMethod, "apply_add_norm", add_norm)
    monkeypatch.setattr(UnquantizedLinearMethod, "apply_normed", normed)


def run_one_at_a_time(model_dir):
    """Each prompt alone, so every decode step has one row."""
    sched = make_scheduler(model_dir, max_total_tokens=256, max_running_requests=1)
    reqs = run_requests(sched, PROMPTS, [greedy(n, ignore_eos=True) for n in NEW_TOKENS])
    return [reqs[str(i)].output_ids for i in range(len(PROMPTS))], sched.runner.model


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_deferred_norms_keep_greedy_output(monkeypatch, arch):
    model_dir = tiny_model_dir(arch, tie=False)
    calls: Counter = Counter()
    install_torch_deferred_norm(monkeypatch, calls)
    outputs, model = run_one_at_a_time(model_dir)
    assert outputs == hf_greedy(model_dir, PROMPTS, NEW_TOKENS)

    layers = model.config.num_hidden_layers
    decode_steps = sum(n - 1 for n in NEW_TOKENS)  # the first token of each comes from its prefill
    # Per one-row step: o_proj hands on in every layer, down_proj in all but the last (the final
    # norm has no projection after it) and the embedding to the first layer; gate/up consumes
    # every o_proj's, qkv every down_proj's and the embedding's. (A one-token prompt's prefill
    # would be one row too; these prompts are longer.)
    assert calls == Counter(produce=(2 * layers - 1) * decode_steps, embed=decode_steps,
                            consume_gated=layers * decode_steps, consume=layers * decode_steps)


def test_a_declining_consumer_gets_the_norm_materialized(monkeypatch):
    model_dir = tiny_model_dir("qwen3", tie=False)
    calls: Counter = Counter()
    install_torch_deferred_norm(monkeypatch, calls, consumer_declines=True)
    outputs, _ = run_one_at_a_time(model_dir)
    assert outputs == hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    assert calls["produce"] > 0 and calls["consume"] + calls["consume_gated"] == calls["produce"] + calls["embed"]


def test_switch_off_keeps_the_norm_kernels(monkeypatch):
    model_dir = tiny_model_dir("qwen3", tie=False)
    calls: Counter = Counter()
    install_torch_deferred_norm(monkeypatch, calls)
    monkeypatch.setenv(ENV_SWITCH, "0")
    outputs, _ = run_one_at_a_time(model_dir)
    assert outputs == hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    assert not calls
