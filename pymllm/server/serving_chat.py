"""/v1/chat/completions: messages in, assistant message (or its deltas) out.

Model text goes through the reasoning parser (``--server.reasoning_parser``) and then, when
the request offers tools, through the tool-call parser.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterable, List, Optional, Type

from starlette.requests import Request
from starlette.responses import Response

from pymllm.engine.io_struct import GenerateReqInput, RequestOutput
from pymllm.orchestrator.grammar import check_grammar
from pymllm.parsers.reasoning import ReasoningParser
from pymllm.parsers.tool_call import (
    DEFAULT_TOOL_CALL_PARSER,
    HermesToolCallParser,
    ToolCallDelta,
    get_tool_call_parser,
)
from pymllm.server.engine_requests import fan_out, new_request_id, normalise_messages, openai_sampling
from pymllm.server.errors import bad_request
from pymllm.server.generation import ChoiceResult, SubRequestGroup, run_to_completion
from pymllm.server.logprobs import chat_logprobs
from pymllm.server.protocol import (
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatResponseMessage,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    NamedToolChoice,
    ToolCallOut,
)
from pymllm.server.reply_fields import finish_reason, json_response, usage_info
from pymllm.server.sse import SSEResponse, event_stream, first_chunk, sse
from pymllm.server.state import ServerState


class _ChatSetup:
    """Per-request choices that both the streamed and the whole reply need."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest) -> None:
        self.id = new_request_id("chatcmpl")
        self.created = int(time.time())
        self.model = state.model_name
        self.n = body.n or 1
        self.logprobs = bool(body.logprobs)
        self.top_logprobs = body.top_logprobs or 0
        self.reasoning_parser: Optional[Type[ReasoningParser]] = state.reasoning_parser
        self.reasoning_open = (
            state.reasoning_open(body.chat_template_kwargs) if self.reasoning_parser else False
        )
        self.tool_parser: Optional[Type[HermesToolCallParser]] = (
            get_tool_call_parser(DEFAULT_TOOL_CALL_PARSER) if body.parses_tool_calls else None
        )


def _tools_shown(body: ChatCompletionRequest) -> Optional[List[dict]]:
    """The tools the chat template shows the model: "none" shows none (it does not call them), a
    named function only that one, "auto" and "required" all of them."""
    if not body.parses_tool_calls:
        return None
    tools = body.tools or []
    if isinstance(body.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == body.tool_choice.function.name]
    return [t.model_dump(exclude_none=True) for t in tools]


def _followable(schema: Dict[str, Any], what: str, param: str) -> Dict[str, Any]:
    """``schema``, or a 400 naming ``what`` when it cannot constrain a reply."""
    try:
        check_grammar(json_schema=json.dumps(schema))
    except ValueError as exc:
        raise bad_request(f"{what}: {exc}", param) from None
    return schema


def _reply_format(body: ChatCompletionRequest) -> Dict[str, Any]:
    """The request's own constraint (response_format, regex, ebnf, structured_outputs) as a
    structural-tag format, to follow the closed reasoning block; a 400 naming it where it cannot
    constrain a reply."""
    param = body.constraints_given()[0]
    try:
        (kind, text), = body.grammar_constraint().items()
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
    try:
        check_grammar(**{kind: text})
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": json.loads(text), "max_whitespace_cnt": 1}
    return {"type": "regex", "pattern": text} if kind == "regex" else {"type": "grammar", "grammar": text}


def _constraint(body: ChatCompletionRequest, setup: _ChatSetup) -> Optional[Dict[str, str]]:
    """The grammar a reply is decoded under, as sampling params (an xgrammar structural tag), where
    response_format's own json_schema is not enough; else None.

    tool_choice "required" or a named function: one or more calls (just one with
    parallel_tool_calls false), one per line, in the layout the tool-call parser reads, each of a
    tool shown with arguments that follow its parameters' schema. The request's own constraint
    (response_format, regex, ebnf, structured_outputs) where the template opens a reasoning block:
    the reply first closes the block, so that the parser finds the value (or the calls, likewise)
    in the content."""
    if body.forces_tool_call:
        parser = get_tool_call_parser(DEFAULT_TOOL_CALL_PARSER)
        tags = []
        for tool in _tools_shown(body) or []:
            name = tool["function"]["name"]
            parameters = tool["function"].get("parameters") or {"type": "object"}
            tags.append({
                "type": "tag",
                "begin": f'{parser.start_tag}\n{{"name": {json.dumps(name)}, "arguments": ',
                "content": {"type": "json_schema", "json_schema": _followable(
                    parameters, f"the parameters of tool {name!r}", "tools"), "max_whitespace_cnt": 1},
                "end": f"}}\n{parser.end_tag}",
            })
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
               "stop_after_first": body.parallel_tool_calls is False}
    elif setup.reasoning_open and body.constrains_output:
        fmt = _reply_format(body)
    else:
        return None
    if setup.reasoning_open:
        fmt = {"type": "sequence", "elements": [
            {"type": "const_string", "value": setup.reasoning_parser.end_tag + "\n\n"}, fmt]}
    return {"structural_tag": json.dumps({"type": "structural_tag", "format": fmt})}


def _engine_requests(body: ChatCompletionRequest, setup: _ChatSetup) -> List[GenerateReqInput]:
    sampling = openai_sampling(
        body, body.max_completion_tokens or body.max_tokens, setup.logprobs, setup.top_logprobs,
        constraint=_constraint(body, setup),
    )
    messages = normalise_messages(body.messages)
    tools = _tools_shown(body)
    return fan_out(
        setup.id,
        setup.n,
        sampling,
        lambda rid, params, _: GenerateReqInput(
            rid=rid,
            messages=messages,
            tools=tools,
            chat_template_kwargs=body.chat_template_kwargs,
            sampling_params=params,
            stream=bool(body.stream),
        ),
    )


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    setup = _ChatSetup(state, body)
    reqs = _engine_requests(body, setup)
    group = SubRequestGroup(state, setup.id, reqs).start()
    if body.stream:
        first = await first_chunk(request, group)
        stream = _ChatStream(setup, group, body.include_usage)
        events = event_stream(request, group, first, stream.start_events(), stream.render, stream.end)
        return SSEResponse(events, group)
    results = await run_to_completion(request, group)
    return json_response(_whole_reply(setup, results))


def _whole_reply(setup: _ChatSetup, results: List[ChoiceResult]) -> ChatCompletion:
    choices = []
    for index, result in enumerate(results):
        reasoning, content = None, result.text
        if setup.reasoning_parser is not None:
            reasoning, content = setup.reasoning_parser(setup.reasoning_open).split(content)
        tool_calls = None
        if setup.tool_parser is not None:
            content, calls = setup.tool_parser().parse(content)
            tool_calls = [
                ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls
            ] or None
        choices.append(
            ChatCompletionChoice(
                index=index,
                message=ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=tool_calls),
                logprobs=chat_logprobs(result.logprobs, setup.top_logprobs) if setup.logprobs else None,
                finish_reason=finish_reason(result.finish_reason, bool(tool_calls)),
            )
        )
    return ChatCompletion(
        id=setup.id, created=setup.created, model=setup.model, choices=choices,
        usage=usage_info(results, setup.n),
    )


class _ChoiceParsers:
    """The streaming parsers of one choice: reasoning first, then tool calls on the content."""

    def __init__(self, setup: _ChatSetup) -> None:
        self.reasoning = setup.reasoning_parser(setup.reasoning_open) if setup.reasoning_parser else None
        self.tools = setup.tool_parser() if setup.tool_parser else None

    @property
    def made_tool_calls(self) -> bool:
        return bool(self.tools and self.tools.calls)

    def feed(self, text: str) -> DeltaMessage:
        if self.reasoning is None:
            return self._delta("", text, final=False)
        part = self.reasoning.feed(text)
        return self._delta(part.reasoning, part.content, final=False)

    def flush(self) -> DeltaMessage:
        if self.reasoning is None:
            return self._delta("", "", final=True)
        part = self.reasoning.flush()
        return self._delta(part.reasoning, part.content, final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> DeltaMessage:
        deltas: List[ToolCallDelta] = []
        if self.tools is not None:
            chunk = self.tools.feed(content)
            if final:
                chunk += self.tools.flush()
            content, deltas = chunk.content, chunk.deltas
        return DeltaMessage(
            reasoning_content=reasoning or None,
            content=content or None,
            tool_calls=[_delta_tool_call(d) for d in deltas] or None,
        )


def _delta_tool_call(d: ToolCallDelta) -> DeltaToolCall:
    return DeltaToolCall(
        index=d.index,
        id=d.id,
        type="function" if d.id is not None else None,
        function=FunctionCallOut(name=d.name, arguments=d.arguments),
    )


def _is_empty(delta: DeltaMessage) -> bool:
    return delta.content is None and delta.reasoning_content is None and not delta.tool_calls


class _ChatStream:
    def __init__(self, setup: _ChatSetup, group: SubRequestGroup, include_usage: bool) -> None:
        self._setup = setup
        self._group = group
        self._include_usage = include_usage
        self._parsers = [_ChoiceParsers(setup) for _ in range(setup.n)]

    def _event(self, choice: ChatChunkChoice) -> str:
        s = self._setup
        return sse(ChatCompletionChunk(id=s.id, created=s.created, model=s.model, choices=[choice]))

    def start_events(self) -> List[str]:
        return [
            self._event(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            for i in range(self._setup.n)
        ]

    def render(self, index: int, out: RequestOutput) -> Iterable[str]:
        parsers = self._parsers[index]
        events = []
        delta = parsers.feed(out.text)
        logprobs = chat_logprobs(out.logprobs, self._setup.top_logprobs) if self._setup.logprobs else None
        if not _is_empty(delta) or logprobs is not None:
            events.append(self._event(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)))
        if out.finished:
            tail = parsers.flush()
            if not _is_empty(tail):
                events.append(self._event(ChatChunkChoice(index=index, delta=tail)))
            reason = finish_reason(out.finish_reason, parsers.made_tool_calls)
            events.append(self._event(ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)))
        return events

    def end(self) -> Iterable[str]:
        if not self._include_usage:
            return []
        s = self._setup
        usage = usage_info(self._group.results, s.n)
        return [sse(ChatCompletionChunk(id=s.id, created=s.created, model=s.model, choices=[], usage=usage))]

