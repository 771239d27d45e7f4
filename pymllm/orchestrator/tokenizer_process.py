"""The tokenizer process: chat templates, tokenization and request validation."""

from __future__ import annotations

import logging
import os
from typing import List, Union

import zmq

from pymllm.configs.global_config import GlobalConfig
from pymllm.configs.model_config import ModelConfig
from pymllm.engine.io_struct import (
    CONTEXT_LENGTH_EXCEEDED,
    AbortReq,
    BatchRequestOutput,
    ControlReq,
    FinishReason,
    GenerateReqInput,
    RequestOutput,
    RequestRefused,
    TokenizedGenerateReq,
)
from pymllm.orchestrator.gc_control import start_serving
from pymllm.orchestrator.ipc import Endpoints, WorkerReady, pull, push
from pymllm.orchestrator.worker_common import run_worker
from pymllm.sampling_params import SamplingParams

logger = logging.getLogger("tokenizer")


class InvalidRequest(RequestRefused):
    """A request refused before it reaches the scheduler."""


class RequestTokenizer:
    """Turns a GenerateReqInput into token ids and validated sampling parameters."""

    def __init__(self, tokenizer, context_length: int, generation_defaults: dict, mm_processor=None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.generation_defaults = generation_defaults
        # pymllm.multimodal.processor.MultimodalProcessor for image models, else None.
        self.mm_processor = mm_processor

    def prompt_ids(self, req: GenerateReqInput) -> List[int]:
        given = [x is not None for x in (req.text, req.input_ids, req.messages)]
        if sum(given) != 1:
            raise InvalidRequest("exactly one of text, input_ids or messages must be given")
        if req.input_ids is not None:
            self.check_vocab(req.input_ids, "token ids")
            return list(req.input_ids)
        if req.text is not None:
            return self.tokenizer.encode(req.text, add_special_tokens=True)
        if self.tokenizer.chat_template is None:
            raise InvalidRequest("this model's tokenizer has no chat template; use completions")
        try:
            ids = self._apply_chat_template(req, req.messages)
        except Exception as e:  # jinja raises TemplateError and friends for bad histories
            # An assistant turn that only calls tools has content null, which templates that
            # concatenate the content as a string (SmolLM2's ChatML one) cannot render: render it empty.
            if not any(m.get("content") is None for m in req.messages):
                raise InvalidRequest(f"cannot apply the chat template: {e}") from e
            emptied = [{**m, "content": ""} if m.get("content") is None else m for m in req.messages]
            try:
                ids = self._apply_chat_template(req, emptied)
            except Exception as e2:
                raise InvalidRequest(f"cannot apply the chat template: {e2}") from e2
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def _apply_chat_template(self, req: GenerateReqInput, messages: List[dict]):
        return self.tokenizer.apply_chat_template(
            messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            tokenize=True,
            **(req.chat_template_kwargs or {}),
        )

    def sampling_params(self, req: GenerateReqInput) -> SamplingParams:
        try:
            params = SamplingParams.from_dict(req.sampling_params)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from e
        self.check_vocab(params.logit_bias, "logit_bias token ids")
        return params.with_defaults(self.generation_defaults)

    def check_vocab(self, ids, what: str) -> None:
        """InvalidRequest naming ``what`` unless every id is a token of the vocabulary."""
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"{what} out of range [0, {vocab}): {bad[:5]}")

    def tokenize(self, req: GenerateReqInput) -> TokenizedGenerateReq:
        from pymllm.multimodal.media import MediaError
        from pymllm.multimodal.processor import image_urls_of

        try:
            urls = image_urls_of(req.messages)
        except MediaError as e:
            raise InvalidRequest(str(e)) from e
        if urls and self.mm_processor is None:
            raise InvalidRequest("this model does not accept images")
        ids = self.prompt_ids(req)
        mm_inputs = None
        if urls:
            try:
                ids, mm_inputs = self.mm_processor.process(ids, urls)
            except MediaError as e:
                raise InvalidRequest(str(e)) from e
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.context_length:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this model's context length is {self.context_length}",
                CONTEXT_LENGTH_EXCEEDED,
            )
        params = self.sampling_params(req)
        # As OpenAI and vLLM do: a request that cannot get the tokens it asks for is refused up
        # front rather than cut short at the context limit. Without max_tokens it may run to it.
        wanted = params.max_new_tokens
        if wanted is not None and len(ids) + wanted > self.context_length:
            raise InvalidRequest(
                f"this model's context length is {self.context_length} tokens, but {len(ids) + wanted} were "
                f"requested ({len(ids)} in the prompt, {wanted} to generate); lower max_tokens",
                CONTEXT_LENGTH_EXCEEDED,
            )
        return TokenizedGenerateReq(req.rid, ids, params, req.stream, mm_inputs=mm_inputs)


def build_request_tokenizer(config: GlobalConfig, model_config: ModelConfig, tokenizer) -> RequestTokenizer:
    """The RequestTokenizer of the tokenizer process (also used in-process by tests); image
    models get the image pipeline under the server's media policy."""
    mm_processor = None
    from pymllm.multimodal.processor import MultimodalProcessor, is_multimodal_config

    if is_multimodal_config(model_config.hf_config):
        from pymllm.multimodal.media import MediaPolicy

        # preprocessor_config.json sits with the weights, or with the tokenizer when split.
        path = model_config.model_path
        if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            path = model_config.tokenizer_path
        mm_processor = MultimodalProcessor.from_pretrained(
            path, model_config.hf_config, MediaPolicy.from_server_config(config.server)
        )
    return RequestTokenizer(tokenizer, model_config.context_length, model_config.generation_defaults, mm_processor)


def rejected_output(rid: str, error: InvalidRequest) -> RequestOutput:
    """The final (and only) output of a request refused with a 400."""
    return RequestOutput(rid, "", [], True, error.finish_reason())


def tokenize_or_reply(worker: RequestTokenizer, req: GenerateReqInput) -> Union[TokenizedGenerateReq, BatchRequestOutput]:
    """The tokenized request, for the scheduler; or the final reply, for the frontend, of a request
    refused (400) or one whose tokenization raised (500: a bug costs the request, not the server)."""
    try:
        return worker.tokenize(req)
    except InvalidRequest as e:
        return BatchRequestOutput([rejected_output(req.rid, e)])
    except Exception:
        logger.exception("tokenizing request %s failed; it ends with an error", req.rid)
        reason = FinishReason("abort", message="internal error while preparing the request", status_code=500)
        return BatchRequestOutput([RequestOutput(req.rid, "", [], True, reason)])


def tokenizer_loop(config: GlobalConfig, model_config: ModelConfig, endpoints: Endpoints) -> None:
    from transformers import AutoTokenizer

    context = zmq.Context.instance()
    inbox = pull(context, endpoints.tokenizer_in)
    to_scheduler = push(context, endpoints.scheduler_in)
    to_frontend = push(context, endpoints.frontend_in)
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer_path)
    worker = build_request_tokenizer(config, model_config, tokenizer)
    start_serving("tokenizer", config.server.gc_warn_ms)
    to_frontend.send(WorkerReady("tokenizer", {"vocab_size": len(tokenizer)}))
    while True:
        msg = inbox.recv()
        if isinstance(msg, GenerateReqInput):
            out = tokenize_or_reply(worker, msg)
            (to_scheduler if isinstance(out, TokenizedGenerateReq) else to_frontend).send(out)
        elif isinstance(msg, (AbortReq, ControlReq)):
            to_scheduler.send(msg)
        else:
            logger.error("unexpected message %r", type(msg).__name__)


def tokenizer_process_main(
    config: GlobalConfig, model_config: ModelConfig, endpoints: Endpoints, parent_conn
) -> None:
    run_worker(
        "tokenizer", config.server.log_level, endpoints.frontend_in, parent_conn,
        lambda: tokenizer_loop(config, model_config, endpoints),
    )
