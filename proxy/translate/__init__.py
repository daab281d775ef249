"""Translation between the four wire formats (pure: no I/O). See hub.py for the design.

The forwarder asks `translation_for(endpoint, upstream)` once per attempt. None means
the caller speaks the upstream's protocol and the byte-exact relay runs untouched;
otherwise the `Translation` turns the request body into the upstream's, and the
upstream's answer (a JSON body, an error body, or a stream through
`Translation.stream`) into the caller's dialect.

    client dialect (endpoint)        upstream protocol
    chat.completions   ─┐        ┌─ openai (chat completions)
    responses          ─┼─ hub ──┼─ anthropic (messages)
    messages           ─┤        └─ gemini (generateContent)
    generateContent    ─┘

Token counts (Anthropic count_tokens, Gemini countTokens) go the same way to the
upstream's own counter, or are estimated here where its protocol has none
(`CountTranslation`, count.py).

Embeddings have their own small hub (hub.EmbedRequest / EmbedResponse) and codecs
(`embed_openai`, `embed_gemini`): OpenAI /v1/embeddings ⇄ Gemini embedContent and
batchEmbedContents, through `EmbeddingsTranslation`. Anthropic has no embeddings API.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.config import UpstreamConfig
from proxy.errors import (
    InvalidRequest,
    ModelNotFound,
    ProxyError,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    UnsupportedParameter,
    UpstreamError,
)
from proxy.translate import anthropic, carrier, chat, embed_gemini, embed_openai, gemini, responses
from proxy.translate.common import ClientContext, UpstreamOptions
from proxy.translate.count import CLIENT_COUNTERS, ESTIMATED_HEADER, UPSTREAM_COUNTERS, Counter, estimate_tokens
from proxy.translate.hub import BadInput, EmbedRequest, EmbedResponse, Request, Response, ToolCall, Untranslatable
from proxy.translate.names import map_names
from proxy.translate.stream import Decoder, Encoder, StreamTranslator

__all__ = ["CountTranslation", "EmbeddingsTranslation", "Translation", "targets", "translation_for"]


@dataclass(frozen=True)
class Codec:
    """One dialect's half of every translation (the functions of its module)."""

    name: str
    decode_request: Callable[[dict[str, Any]], Request] | None
    encode_request: Callable[[Request, UpstreamOptions], dict[str, Any]] | None
    decode_response: Callable[[dict[str, Any]], Response] | None
    encode_response: Callable[[Response, ClientContext], dict[str, Any]]
    decoder: Callable[[], Decoder] | None
    encoder: Callable[[ClientContext], Encoder]
    # Its streams allow one open block at a time (see sequence.py).
    sequential: bool
    # The tool names it accepts as an upstream (names.py maps the others); None: any.
    tool_name: re.Pattern[str] | None = None


CHAT = Codec("chat", chat.decode_request, chat.encode_request, chat.decode_response, chat.encode_response,
             chat.StreamDecoder, chat.StreamEncoder, False, chat.TOOL_NAME)
ANTHROPIC = Codec("anthropic", anthropic.decode_request, anthropic.encode_request, anthropic.decode_response,
                  anthropic.encode_response, anthropic.StreamDecoder, anthropic.StreamEncoder, True, anthropic.TOOL_NAME)

GEMINI = Codec("gemini", gemini.decode_request, gemini.encode_request, gemini.decode_response, gemini.encode_response,
               gemini.StreamDecoder, gemini.StreamEncoder, False, gemini.TOOL_NAME)
# Responses is a client dialect here; Responses calls to an upstream that serves the
# Responses API go there byte for byte.
RESPONSES = Codec("responses", responses.decode_request, None, None, responses.encode_response,
                  None, responses.StreamEncoder, True)

# Cursor's Responses-shaped bodies on the chat route, answered in chat's shape (P24).
CHAT_WITH_RESPONSES_BODY = Codec("chat", responses.decode_request, None, None, chat.encode_response,
                                 None, chat.StreamEncoder, False)

# The client dialect of each model-calling endpoint that can be translated.
CLIENT_CODECS: dict[str, Codec] = {
    "chat.completions": CHAT,
    "responses": RESPONSES,
    "messages": ANTHROPIC,
    "generateContent": GEMINI,
    "streamGenerateContent": GEMINI,
}
UPSTREAM_CODECS: dict[str, Codec] = {"openai": CHAT, "anthropic": ANTHROPIC, "gemini": GEMINI}


@dataclass(frozen=True)
class EmbedCodec:
    """One protocol's embeddings wire format (the functions of its embed_ module)."""

    codec: Codec               # the protocol's codec, for what Translation shares (errors)
    endpoint: str              # the endpoint an upstream of this protocol is called on
    decode_request: Callable[[dict[str, Any]], EmbedRequest]
    encode_request: Callable[[EmbedRequest, UpstreamOptions], dict[str, Any]]
    decode_response: Callable[[dict[str, Any]], EmbedResponse]
    encode_response: Callable[[EmbedResponse, EmbedRequest, ClientContext], dict[str, Any]]


OPENAI_EMBED = EmbedCodec(CHAT, "embeddings", embed_openai.decode_request, embed_openai.encode_request,
                          embed_openai.decode_response, embed_openai.encode_response)
GEMINI_EMBED = EmbedCodec(GEMINI, "batchEmbedContents", embed_gemini.decode_request, embed_gemini.encode_request,
                          embed_gemini.decode_response, embed_gemini.encode_response)
EMBED_CLIENT_CODECS: dict[str, EmbedCodec] = {
    "embeddings": OPENAI_EMBED,
    "embedContent": GEMINI_EMBED,
    "batchEmbedContents": GEMINI_EMBED,
}
EMBED_UPSTREAM_CODECS: dict[str, EmbedCodec] = {"openai": OPENAI_EMBED, "gemini": GEMINI_EMBED}


# A count is answered on every protocol: by its counter, or estimated (count.py).
_TARGETS = {endpoint: frozenset(UPSTREAM_CODECS) for endpoint in (*CLIENT_CODECS, *CLIENT_COUNTERS)}
# Embeddings: the protocols with an embeddings API (Anthropic has none).
_TARGETS.update((endpoint, frozenset(EMBED_UPSTREAM_CODECS)) for endpoint in EMBED_CLIENT_CODECS)
_NONE: frozenset[str] = frozenset()


def targets(endpoint: str) -> frozenset[str]:
    """The upstream protocols a call on `endpoint` may be served by through translation
    (the same object every time: the router keys its cached plans on it)."""
    return _TARGETS.get(endpoint, _NONE)


def translation_for(endpoint: str, upstream: UpstreamConfig, body: dict[str, Any] | None = None) -> Translation | None:
    client = CLIENT_CODECS.get(endpoint)
    if client is None:
        embed = EMBED_CLIENT_CODECS.get(endpoint)
        if embed is not None:
            embed_target = EMBED_UPSTREAM_CODECS.get(upstream.protocol)
            if embed_target is None or embed_target is embed:
                return None
            return EmbeddingsTranslation(embed, embed_target, upstream)
        counter = CLIENT_COUNTERS.get(endpoint)
        if counter is None:
            return None
        target_counter = UPSTREAM_COUNTERS.get(upstream.protocol)
        # Same dialect: byte-exact, unless the body names its model where only the counter
        # can rewrite it (a trial: the name given does not matter).
        if target_counter is counter and (body is None or counter.readdress(body, "") is None):
            return None
        return CountTranslation(counter, target_counter, upstream, body)
    if client is CHAT and body is not None and not body.get("messages") and "input" in body:
        client = CHAT_WITH_RESPONSES_BODY
    if client is RESPONSES and upstream.protocol == "openai" and upstream.responses:
        return None
    target = UPSTREAM_CODECS.get(upstream.protocol)
    if target is None or target is client:
        return None
    return Translation(client, target, upstream)


class Translation:
    """One attempt's translation: the request out, the answer back."""

    def __init__(self, client: Codec, upstream: Codec, config: UpstreamConfig) -> None:
        self.client = client
        self.upstream = upstream
        self._config = config
        self.dropped: list[str] = []
        self._include_usage = False
        self._freeform: frozenset[str] = frozenset()
        self._namespaces: dict[str, str] = {}
        self._names: dict[str, str] = {}     # upstream tool name → the client's (names.py)

    def upstream_endpoint(self, stream: bool) -> str:
        """The upstream's endpoint name (for its URL and its usage meter)."""
        if self.upstream is GEMINI:
            return "streamGenerateContent" if stream else "generateContent"
        return "messages" if self.upstream is ANTHROPIC else "chat.completions"

    def upstream_query(self, stream: bool) -> str:
        return "alt=sse" if self.upstream is GEMINI and stream else ""

    def request(self, body: dict[str, Any], model: str, stream: bool) -> bytes:
        """The upstream request body (BadInput, Untranslatable → a 400 for the caller)."""
        assert self.client.decode_request is not None and self.upstream.encode_request is not None
        try:
            req = self.client.decode_request(body)
            req.stream = stream
            for msg in req.messages:
                if msg.role == "assistant":
                    msg.parts = carrier.anchor_signatures(msg.parts)
            # Kept under the client's names: the answer's calls get those back first.
            self._freeform = frozenset(t.name for t in req.tools if t.freeform)
            self._namespaces = {t.name: t.namespace for t in req.tools if t.namespace}
            if self.upstream.tool_name is not None:
                self._names = map_names(req, self.upstream.tool_name)
            out = self.upstream.encode_request(req, UpstreamOptions(model, self._config.default_max_tokens))
        except (BadInput, Untranslatable) as exc:
            raise _refusal(exc, self._config) from None
        self.dropped = req.dropped
        self._include_usage = req.include_usage
        return orjson.dumps(out)

    def context(self, model: str, stream: bool, prompt_estimate: int, query: str = "") -> ClientContext:
        """What the answer's encoder needs to know of the caller's request."""
        return ClientContext(model, stream, self._include_usage, prompt_estimate,
                             freeform_tools=self._freeform, namespaces=self._namespaces, sse=self.client is not GEMINI or "alt=sse" in query)

    def response(self, data: bytes, ctx: ClientContext) -> bytes:
        assert self.upstream.decode_response is not None
        doc = _json_object(data)
        resp = self.upstream.decode_response(doc)
        if self._names:
            for part in resp.parts:
                if isinstance(part, ToolCall):
                    part.name = self._names.get(part.name, part.name)
        return orjson.dumps(self.client.encode_response(resp, ctx))

    def stream(self, ctx: ClientContext) -> StreamTranslator:
        assert self.upstream.decoder is not None
        return StreamTranslator(self.upstream.decoder(), self.client.encoder(ctx), self.client.sequential, self._names,
                                "text/event-stream" if ctx.sse else "application/json; charset=UTF-8")

    def error(self, status: int, data: bytes, retry_after: str | None) -> ProxyError:
        """An upstream 4xx in the caller's dialect: its body shape is the upstream's, so it
        cannot pass through; its message is kept so users can report it (TRANSLATION §0.6)."""
        message = _upstream_message(data)
        text = f"The upstream ({self._config.protocol}) refused the request: {message}"
        if status == 429:
            retry = int(retry_after) if retry_after and retry_after.isdigit() else None
            if "quota" in message.lower() or "billing" in message.lower():
                return QuotaExceeded(text)
            return RateLimited(text, retry_after_s=retry)
        if status == 402:
            return QuotaExceeded(text)
        if status == 404:
            return ModelNotFound(text)
        if status == 413:
            return RequestTooLarge(text)
        lowered = message.lower()
        too_long = "too long" in lowered or "context length" in lowered or "exceeds the maximum" in lowered
        err = InvalidRequest(text, code="context_length_exceeded" if too_long else "upstream_invalid_request")
        err.status = status if 400 <= status < 500 else 400
        return err


class CountTranslation(Translation):
    """A token count in the caller's dialect: through the upstream's own counter, or,
    where its protocol has none or cannot say the request (`local`), estimated here
    (`estimate`) with no upstream call at all: an estimate serves a client that counts
    constantly (Claude Code) better than a refusal (TRANSLATION §5.1). Counting is free
    (its meter is FreeMeter)."""

    def __init__(self, client: Counter, upstream: Counter | None, config: UpstreamConfig,
                 body: dict[str, Any] | None = None) -> None:
        # The upstream's codec for its tool-name rule; the requests and answers are the counters'.
        super().__init__(CHAT, UPSTREAM_CODECS[config.protocol], config)
        self._client_counter = client
        self._upstream_counter = upstream
        self.local = upstream is None
        # The caller's own dialect: its body goes as it is but for the model it names.
        self._same = upstream is client
        if upstream is not None and body is not None and not self._same:
            try:
                self._encode(body, config.name)   # a trial: the model's name changes nothing here
            except Untranslatable:
                self.local = True   # e.g. Gemini's built-in tools towards Anthropic
            except BadInput:
                pass   # refused by request()

    def upstream_endpoint(self, stream: bool) -> str:
        assert self._upstream_counter is not None   # not local
        return self._upstream_counter.endpoint

    def upstream_query(self, stream: bool) -> str:
        return ""

    def request(self, body: dict[str, Any], model: str, stream: bool) -> bytes:
        if self._same:
            out = self._client_counter.readdress(body, model)
            assert out is not None   # translation_for tried it
            return orjson.dumps(out)
        try:
            return orjson.dumps(self._encode(body, model))
        except (BadInput, Untranslatable) as exc:
            raise _refusal(exc, self._config) from None

    def _encode(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        assert self._upstream_counter is not None   # not local
        req = self._client_counter.decode_request(body)
        if self.upstream.tool_name is not None:   # names the upstream's counter would refuse too
            map_names(req, self.upstream.tool_name)
        return self._upstream_counter.encode_request(req, UpstreamOptions(model, self._config.default_max_tokens))

    def response(self, data: bytes, ctx: ClientContext) -> bytes:
        assert self._upstream_counter is not None   # not local
        if self._same:
            return data   # the upstream's own answer, in the caller's own dialect
        tokens = self._upstream_counter.decode_response(_json_object(data))
        if tokens is None:
            raise UpstreamError("The upstream's token count is not the JSON its protocol promises.")
        return orjson.dumps(self._client_counter.encode_response(tokens))

    def estimate(self, body: dict[str, Any]) -> tuple[bytes, tuple[str, str]]:
        """The answer for an upstream without a counter, and the header that marks it an
        estimate. A malformed body is refused (400) as the upstream would refuse it."""
        try:
            req = self._client_counter.decode_request(body)
        except BadInput as exc:
            raise _refusal(exc, self._config) from None
        except Untranslatable:
            # Features no other protocol takes (Gemini's built-in tools) still count.
            req = None
        tokens = estimate_tokens(req, body)
        return orjson.dumps(self._client_counter.encode_response(tokens)), ESTIMATED_HEADER


class EmbeddingsTranslation(Translation):
    """An embeddings call across protocols: OpenAI /v1/embeddings ⇄ Gemini embedContent /
    batchEmbedContents. Never streamed; the upstream's errors are rewritten as any
    translated call's are."""

    def __init__(self, client: EmbedCodec, upstream: EmbedCodec, config: UpstreamConfig) -> None:
        super().__init__(client.codec, upstream.codec, config)
        self._from = client
        self._to = upstream
        self._req = EmbedRequest([])

    def upstream_endpoint(self, stream: bool) -> str:
        return self._to.endpoint

    def upstream_query(self, stream: bool) -> str:
        return ""

    def request(self, body: dict[str, Any], model: str, stream: bool) -> bytes:
        try:
            req = self._from.decode_request(body)
            out = self._to.encode_request(req, UpstreamOptions(model, self._config.default_max_tokens))
        except (BadInput, Untranslatable) as exc:
            raise _refusal(exc, self._config) from None
        self._req = req
        self.dropped = req.dropped
        return orjson.dumps(out)

    def response(self, data: bytes, ctx: ClientContext) -> bytes:
        doc = _json_object(data)
        resp = self._to.decode_response(doc)
        if len(resp.vectors) != len(self._req.inputs) or not all(resp.vectors):
            raise UpstreamError(
                f"The upstream answered {len(resp.vectors)} embeddings for {len(self._req.inputs)} inputs."
            )
        return orjson.dumps(self._from.encode_response(resp, self._req, ctx))

    def stream(self, ctx: ClientContext) -> StreamTranslator:
        raise AssertionError("embeddings never stream (their endpoints refuse `stream`)")


def _refusal(exc: BadInput | Untranslatable, config: UpstreamConfig) -> ProxyError:
    """A request the caller must change: a 400 in its dialect."""
    if isinstance(exc, BadInput):
        return InvalidRequest(str(exc), param=exc.param)
    return UnsupportedParameter(
        f"{exc} (upstream '{config.name}', protocol {config.protocol}).",
        param=exc.feature.split("[")[0].split(" ")[0], code="untranslatable",
    )


def _upstream_message(data: bytes) -> str:
    # All three providers put it at error.message.
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "(no message)"
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return str(message)[:2000] if message else "(no message)"


def _json_object(data: bytes) -> dict[str, Any]:
    """An upstream's answer body, which its protocol promises is a JSON object."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise UpstreamError("The upstream's answer is not the JSON object its protocol promises.")
    return doc
