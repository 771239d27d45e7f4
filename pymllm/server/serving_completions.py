"""/v1/completions: raw prompts (text or token ids, one or a batch) in, text out."""

from __future__ import annotations

import time
from typing import Iterable, List, Optional, Union

from starlette.requests import Request
from starlette.responses import Response

from pymllm.engine.io_struct import GenerateReqInput, RequestOutput
from pymllm.server.engine_requests import check_token_ids, fan_out, new_request_id, openai_sampling
from pymllm.server.generation import ChoiceResult, SubRequestGroup, run_to_completion
from pymllm.server.logprobs import TextOffsets, completion_logprobs, joined_completion_logprobs
from pymllm.server.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from pymllm.server.reply_fields import finish_reason, json_response, usage_info
from pymllm.server.sse import SSEResponse, event_stream, first_chunk, sse
from pymllm.server.state import ServerState

Prompt = Union[str, List[int]]

# OpenAI's default for the legacy completions API.
_DEFAULT_MAX_TOKENS = 16


def _prompts(body: CompletionRequest) -> List[Prompt]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class _CompletionSetup:
    def __init__(self, state: ServerState, body: CompletionRequest, prompts: List[Prompt]) -> None:
        self.id = new_request_id("cmpl")
        self.created = int(time.time())
        self.model = state.model_name
        self.n = body.n or 1
        self.logprobs: Optional[int] = body.logprobs
        # Echoed prompt text per choice (choices are prompt-major, n per prompt).
        echo = [_prompt_text(state, p) if body.echo else "" for p in prompts]
        self.echo = [text for text in echo for _ in range(self.n)]
        # echo with logprobs: the logprobs cover the prompt's tokens too, as OpenAI's do.
        self.scores_prompt = bool(body.echo) and self.logprobs is not None

    def logprobs_of(self, result_logprobs: Optional[list], offsets: TextOffsets) -> Optional[CompletionLogprobs]:
        if self.logprobs is None:
            return None
        return completion_logprobs(result_logprobs, self.logprobs, offsets)

    def prompt_logprobs_of(self, prompt_logprobs: Optional[list]) -> Optional[CompletionLogprobs]:
        """The echoed prompt's logprobs (offsets from the start of the choice's text)."""
        if not self.scores_prompt:
            return None
        return completion_logprobs(prompt_logprobs, self.logprobs, TextOffsets())


def _prompt_text(state: ServerState, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return state.client.tokenizer.decode(prompt, skip_special_tokens=False)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    prompts = _prompts(body)
    for prompt in prompts:
        if isinstance(prompt, list):
            check_token_ids(prompt, state.vocab_size, "prompt")
    setup = _CompletionSetup(state, body, prompts)
    wants_logprobs = setup.logprobs is not None
    max_tokens = _DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    sampling = openai_sampling(body, max_tokens, wants_logprobs, setup.logprobs or 0)
    if setup.scores_prompt:
        sampling["prompt_logprobs"] = True

    def make(rid: str, params: dict, prompt_index: int) -> GenerateReqInput:
        prompt = prompts[prompt_index]
        return GenerateReqInput(
            rid=rid,
            text=prompt if isinstance(prompt, str) else None,
            input_ids=prompt if isinstance(prompt, list) else None,
            sampling_params=params,
            stream=bool(body.stream),
        )

    reqs = fan_out(setup.id, setup.n, sampling, make, num_prompts=len(prompts))
    group = SubRequestGroup(state, setup.id, reqs).start()
    if body.stream:
        first = await first_chunk(request, group)
        stream = _CompletionStream(setup, group, body.include_usage)
        events = event_stream(request, group, first, stream.start_events(), stream.render, stream.end)
        return SSEResponse(events, group)
    results = await run_to_completion(request, group)
    return json_response(_whole_reply(setup, results))


def _whole_reply(setup: _CompletionSetup, results: List[ChoiceResult]) -> Completion:
    choices = []
    for index, result in enumerate(results):
        echo = setup.echo[index]
        logprobs = setup.logprobs_of(result.logprobs, TextOffsets(len(echo)))
        logprobs = joined_completion_logprobs([setup.prompt_logprobs_of(result.prompt_logprobs), logprobs])
        if setup.logprobs is not None and logprobs is None:
            logprobs = CompletionLogprobs()
        choices.append(
            CompletionChoice(
                index=index, text=echo + result.text, logprobs=logprobs,
                finish_reason=finish_reason(result.finish_reason),
            )
        )
    return Completion(
        id=setup.id, created=setup.created, model=setup.model, choices=choices,
        usage=usage_info(results, setup.n),
    )


class _CompletionStream:
    def __init__(self, setup: _CompletionSetup, group: SubRequestGroup, include_usage: bool) -> None:
        self._setup = setup
        self._group = group
        self._include_usage = include_usage
        # Where the next token starts in each choice's text, for logprobs.text_offset.
        self._offsets = [TextOffsets(len(text)) for text in setup.echo]
        # Choices whose echo waits for their prompt's logprobs (they come with the first output).
        self._echo_due = [setup.scores_prompt] * len(setup.echo)

    def _event(self, choice: CompletionChoice) -> str:
        s = self._setup
        return sse(Completion(id=s.id, created=s.created, model=s.model, choices=[choice]))

    def start_events(self) -> List[str]:
        return [
            self._event(CompletionChoice(index=i, text=text))
            for i, text in enumerate(self._setup.echo)
            if text and not self._echo_due[i]
        ]

    def render(self, index: int, out: RequestOutput) -> Iterable[str]:
        events = []
        if self._echo_due[index]:
            self._echo_due[index] = False
            prompt_logprobs = self._setup.prompt_logprobs_of(out.prompt_logprobs)
            events.append(self._event(CompletionChoice(index=index, text=self._setup.echo[index],
                                                       logprobs=prompt_logprobs)))
        logprobs = self._setup.logprobs_of(out.logprobs, self._offsets[index])
        if not (out.text or logprobs is not None or out.finished):
            return events
        reason = finish_reason(out.finish_reason) if out.finished else None
        events.append(self._event(CompletionChoice(index=index, text=out.text, logprobs=logprobs, finish_reason=reason)))
        return events

    def end(self) -> Iterable[str]:
        if not self._include_usage:
            return []
        s = self._setup
        usage = usage_info(self._group.results, s.n)
        return [sse(Completion(id=s.id, created=s.created, model=s.model, choices=[], usage=usage))]
