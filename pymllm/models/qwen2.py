"""Qwen2: the Llama decoder with q/k/v bias."""

from pymllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias_follows_config = False
