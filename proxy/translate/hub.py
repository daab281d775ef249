"""The hub: the one internal form every dialect translates to and from.

Each dialect module (`chat`, `anthropic`, `responses`, `gemini`) converts its own wire
format to these types and back; no module knows another dialect. A translated call is
then always two steps, client dialect → hub → upstream dialect, and back, so four
codecs cover every pair instead of twelve ad-hoc converters (TRANSLATION.md §0.1).

The hub is an item list close to Anthropic's content blocks, because that is the
richest of the four: a conversation is `Message`s whose `parts` are text, images,
thinking (with its opaque signature), tool calls and tool results. What one dialect
has and another lacks is kept here anyway (cache_control, signatures, cache-write
tokens), so it survives a round trip through a dialect that can carry it.

Opaque provider state (an Anthropic thinking signature, a Gemini thoughtSignature, a
chat upstream's reasoning_content) is a `Sig`: the value plus the protocol that issued
it (`owner`). Encoders for an upstream use a Sig only when they own it; client encoders
wrap it in a carrier the client echoes back (see `carrier.py`).

Streams are `Event`s: a decoder turns upstream events into hub events, an encoder turns
hub events into client bytes, one event at a time (see `stream.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# ---------------------------------------------------------------------------- content


@dataclass(frozen=True, slots=True)
class Sig:
    """Opaque reasoning state, valid only at the provider family that issued it."""

    owner: str      # "anthropic" | "gemini" | "chat" (a chat upstream's reasoning_content)
    value: str


@dataclass(slots=True)
class Text:
    text: str
    cache: dict[str, Any] | None = None    # Anthropic cache_control, kept as given
    sig: Sig | None = None                 # Gemini puts thoughtSignature on text parts too


@dataclass(slots=True)
class Image:
    media_type: str | None = None          # with `data`
    data: str | None = None                # base64
    url: str | None = None                 # a remote URL (the gateway never fetches it)
    detail: str | None = None              # OpenAI's detail hint
    cache: dict[str, Any] | None = None


@dataclass(slots=True)
class Thinking:
    text: str
    sig: Sig | None = None
    redacted: bool = False                 # Anthropic redacted_thinking: the data is sig.value


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str                         # a JSON text (OpenAI's form); "" means {}
    sig: Sig | None = None                 # Gemini puts thoughtSignature on the call's part


@dataclass(slots=True)
class ToolResult:
    call_id: str
    content: list[Text | Image]
    is_error: bool = False
    name: str | None = None                # Gemini needs it; filled from the history
    cache: dict[str, Any] | None = None


Part = Text | Image | Thinking | ToolCall | ToolResult
Role = Literal["user", "assistant"]


@dataclass(slots=True)
class Message:
    role: Role
    parts: list[Part]


# ---------------------------------------------------------------------------- request


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]             # JSON Schema, root type object
    cache: dict[str, Any] | None = None
    # A free-form tool (Responses `custom`, e.g. Codex's apply_patch): elsewhere a
    # function with one string parameter `input`; its calls go back as free-form input.
    freeform: bool = False
    # A Responses namespace member: `name` is then "<namespace>__<member>" upstream.
    namespace: str | None = None


@dataclass(slots=True)
class ToolChoice:
    mode: Literal["auto", "any", "none", "tool"]
    name: str | None = None                # with mode "tool"


@dataclass(slots=True)
class OutputFormat:
    kind: Literal["json_object", "json_schema"]
    name: str = "output"
    schema: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(slots=True)
class Reasoning:
    effort: str | None = None              # "minimal" | "low" | "medium" | "high"
    budget: int | None = None              # thinking tokens (Anthropic, Gemini)
    enabled: bool = True


@dataclass(slots=True)
class Request:
    model: str
    messages: list[Message]
    system: list[Text] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False            # a chat client asked for the usage chunk
    output: OutputFormat | None = None
    reasoning: Reasoning | None = None
    user: str | None = None
    # Asked for but translatable only to some upstreams: encoders refuse what they lack.
    n: int = 1
    logprobs: bool = False
    # Dropped on the way, by name, for the x-llm-proxy-translation header.
    dropped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- response

# Why the model stopped, in the hub's words (each dialect maps its own).
Finish = Literal["stop", "length", "tool_calls", "content_filter", "stop_sequence", "refusal", "error"]


@dataclass(slots=True)
class Usage:
    """The upstream's own numbers, normalised: totals include their parts."""

    input: int = 0             # every prompt token, cached and cache-written included
    output: int = 0            # every output token, reasoning included
    cached: int = 0            # cache reads
    cache_write: int = 0       # Anthropic cache writes
    reasoning: int = 0

    @property
    def uncached_input(self) -> int:
        return max(0, self.input - self.cached - self.cache_write)


@dataclass(slots=True)
class Response:
    id: str
    model: str
    parts: list[Text | Thinking | ToolCall]
    finish: Finish = "stop"
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    refusal: str | None = None


# ---------------------------------------------------------------------------- stream events


@dataclass(slots=True)
class Start:
    id: str
    model: str
    usage: Usage | None = None             # the input counts, when the upstream says them early


@dataclass(slots=True)
class BlockStart:
    index: int                             # the decoder's own counter, never a wire index
    part: Text | Thinking | ToolCall       # empty text/arguments; the tool call's id and name


@dataclass(slots=True)
class Delta:
    index: int
    text: str                              # text, thinking or argument fragment, by block kind


@dataclass(slots=True)
class Signature:
    index: int
    sig: Sig


@dataclass(slots=True)
class BlockStop:
    index: int


@dataclass(slots=True)
class End:
    finish: Finish
    usage: Usage | None = None
    stop_sequence: str | None = None
    refusal: str | None = None


@dataclass(slots=True)
class Failure:
    """The upstream reported an error inside the stream."""

    status: int
    message: str


Event = Start | BlockStart | Delta | Signature | BlockStop | End | Failure


# ---------------------------------------------------------------------------- embeddings


@dataclass(slots=True)
class EmbedRequest:
    """An embeddings call (OpenAI /v1/embeddings, Gemini embedContent / batchEmbedContents):
    one vector per input, in order."""

    inputs: list[str | list[int]]          # texts, or OpenAI token-id arrays
    dimensions: int | None = None          # OpenAI `dimensions`, Gemini `outputDimensionality`
    base64: bool = False                   # OpenAI encoding_format "base64": float32 LE, base64
    single: bool = False                   # Gemini embedContent: one `embedding` object back
    task_type: str | None = None           # Gemini's taskType (no OpenAI field)
    title: str | None = None               # Gemini's title (RETRIEVAL_DOCUMENT)
    user: str | None = None                # OpenAI's end-user id (no Gemini field)
    dropped: list[str] = field(default_factory=list)


@dataclass(slots=True)
class EmbedResponse:
    vectors: list[list[float]]
    prompt_tokens: int | None = None       # the upstream's count; None when it reports none


class Untranslatable(Exception):
    """A request feature the upstream's protocol cannot express (rendered as a 400)."""

    def __init__(self, feature: str, protocol: str, detail: str = "") -> None:
        self.feature = feature
        self.protocol = protocol
        super().__init__(
            f"'{feature}' cannot be translated for this model's {protocol} upstream"
            + (f": {detail}" if detail else ".")
        )


class BadInput(Exception):
    """The client's body is malformed for its own dialect (rendered as a 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)
