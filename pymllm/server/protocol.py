"""Pydantic models of the OpenAI-compatible and native request/response bodies.

Request models validate value ranges so that a bad value is a 400 with an error object,
never a 500 from deep inside the engine.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Annotated

from pymllm.orchestrator.grammar import choice_ebnf

# ---------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Dict[str, Any] = Field(..., alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self

    def schema(self) -> Optional[Dict[str, Any]]:
        """The JSON schema the output must follow; None for text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_
        return None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extra parameter: exactly one constraint on the reply."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: Optional[Union[Dict[str, Any], str]] = Field(None, alias="json")  # a JSON schema, or its JSON text
    regex: Optional[str] = None
    choice: Optional[List[str]] = Field(None, min_length=1)
    grammar: Optional[str] = None  # EBNF

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, "json_" if name == "json" else name) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, regex, choice and grammar, got "
                             f"{', '.join(given) or 'none'}")
        return self


class SamplingRequestFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[Annotated[int, Field(ge=0)]]] = None
    n: Optional[int] = Field(1, ge=1, le=128)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    # token id (a string in JSON) -> bias in [-100, 100] added to its logit
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # json_object / json_schema: the output is constrained to the schema (pymllm.orchestrator.grammar)
    response_format: Optional[ResponseFormat] = None
    # Constraints beyond OpenAI's, as the servers users know them: SGLang's regex and ebnf, vLLM's
    # structured_outputs. At most one constraint per request, response_format's included.
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structured_outputs: Optional[StructuredOutputs] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> "SamplingRequestFields":
        # As OpenAI answers: a client asking for stream options without a stream has a bug.
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> "SamplingRequestFields":
        given = self.constraints_given()
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}: the reply can follow one constraint")
        return self

    def constraints_given(self) -> List[str]:
        """The request fields that constrain the reply, in the order they are named."""
        rf = self.response_format is not None and self.response_format.type != "text"
        return [name for name, set_ in (("response_format", rf), ("regex", self.regex is not None),
                                        ("ebnf", self.ebnf is not None),
                                        ("structured_outputs", self.structured_outputs is not None)) if set_]

    @property
    def constrains_output(self) -> bool:
        return bool(self.constraints_given())

    def grammar_constraint(self) -> Dict[str, str]:
        """The reply's constraint as SamplingParams fields ({json_schema | regex | ebnf: text}), or {}."""
        if self.regex is not None:
            return {"regex": self.regex}
        if self.ebnf is not None:
            return {"ebnf": self.ebnf}
        so = self.structured_outputs
        if so is not None:
            if so.json_ is not None:
                return {"json_schema": so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)}
            if so.regex is not None:
                return {"regex": so.regex}
            if so.choice is not None:
                return {"ebnf": choice_ebnf(so.choice)}
            return {"ebnf": so.grammar}
        schema = self.response_format.schema() if self.response_format is not None else None
        return {"json_schema": json.dumps(schema)} if schema is not None else {}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: Optional[str] = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCallIn(BaseModel):
    name: str
    arguments: Union[str, Dict[str, Any]] = "{}"


class ToolCallIn(BaseModel):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, List[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None  # earlier turns' reasoning, for templates that use it

    @model_validator(mode="after")
    def _check_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class FunctionDefinition(BaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


# apply_chat_template's own arguments. chat_template_kwargs are meant for template variables
# (enable_thinking, ...); these would instead change what the tokenizer process gets back
# (return_tensors gave an array that crashed the scheduler) or how the prompt is built.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class ChatCompletionRequest(SamplingRequestFields):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[List[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(self.chat_template_kwargs or {}))
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {tool.function.name for tool in self.tools or []}:
                raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
        if self.forces_tool_call and self.constrains_output:
            raise ValueError(f"{self.constraints_given()[0]} cannot constrain a reply that tool_choice makes a "
                             "tool call")
        return self

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool_call(self) -> bool:
        """tool_choice "required" or a named function: the reply must be a call."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))


PromptType = Union[str, List[str], List[int], List[List[int]]]


class CompletionRequest(SamplingRequestFields):
    prompt: PromptType
    # 0 generates nothing: with echo and logprobs, a request that only scores its prompt.
    max_tokens: Optional[int] = Field(None, ge=0)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        if isinstance(self.prompt, (str, list)) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(self.prompt, list) and any(
            isinstance(p, (str, list)) and len(p) == 0 for p in self.prompt
        ):
            raise ValueError("prompt must not contain empty prompts")
        return self


class GenerateRequest(BaseModel):
    """Native /generate: raw text or token ids, sampling params as in SamplingParams."""

    text: Optional[str] = None
    input_ids: Optional[List[int]] = None
    sampling_params: Dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    rid: Optional[str] = None

    @model_validator(mode="after")
    def _check_input(self) -> "GenerateRequest":
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if not (self.text if self.text is not None else self.input_ids):
            raise ValueError("the prompt must not be empty")
        return self


class AbortRequest(BaseModel):
    rid: str


# ---------------------------------------------------------------- responses


def _is_none(value: Any) -> bool:
    return value is None


def omit_when_none() -> Any:
    """A response field left out of the JSON while it is None, where OpenAI's bodies omit the key
    rather than send null (a delta carries only the keys it changes; ``finish_reason: null``, a
    plain Optional field, is always present). Per-field ``exclude_if`` keeps serialisation in
    pydantic-core: a model-wide wrap serializer turned every reply into Python dicts first, 5x
    slower for a 1,024-token logprobs reply."""
    return Field(None, exclude_if=_is_none)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: Optional[List[ChatTokenLogprob]] = None


class FunctionCallOut(BaseModel):
    name: Optional[str] = omit_when_none()
    arguments: Optional[str] = omit_when_none()


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = omit_when_none()
    tool_calls: Optional[List[ToolCallOut]] = omit_when_none()


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatCompletionChoice]
    usage: UsageInfo


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = omit_when_none()
    type: Optional[Literal["function"]] = omit_when_none()
    function: Optional[FunctionCallOut] = omit_when_none()


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = omit_when_none()
    content: Optional[str] = omit_when_none()
    reasoning_content: Optional[str] = omit_when_none()
    tool_calls: Optional[List[DeltaToolCall]] = omit_when_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[UsageInfo] = omit_when_none()


class CompletionLogprobs(BaseModel):
    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = omit_when_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pymllm"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]
