"""OpenAI embeddings (`POST /v1/embeddings`) ⇄ the hub's EmbedRequest / EmbedResponse.

    request:  {model, input: str | [str] | [int] | [[int]], dimensions?, encoding_format?, user?}
    response: {object: "list", data: [{object: "embedding", index, embedding}], model,
               usage: {prompt_tokens, total_tokens}}

`encoding_format: "base64"` asks for each vector as the base64 of its little-endian float32
bytes; openai-python sends it whenever its caller sets no format, then decodes it, so a
translated answer must honour it. Upstream, the gateway always asks for floats.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from proxy.translate.common import ClientContext, UpstreamOptions, opt_int, opt_str
from proxy.translate.hub import BadInput, EmbedRequest, EmbedResponse

_FORMATS = ("float", "base64")


def decode_request(body: dict[str, Any]) -> EmbedRequest:
    raw = body.get("input")
    inputs: list[str | list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(_is_int(x) for x in raw):
        inputs = [list(raw)]                        # one token-id array
    elif isinstance(raw, list) and raw and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in raw):
        inputs = [list(x) for x in raw]             # several token-id arrays
    else:
        raise BadInput("'input' must be a non-empty string, array of strings, or array of token arrays.", "input")
    fmt = opt_str(body.get("encoding_format"), "encoding_format") or "float"
    if fmt not in _FORMATS:
        raise BadInput("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dimensions = opt_int(body.get("dimensions"), "dimensions")
    if dimensions is not None and dimensions < 1:
        raise BadInput("'dimensions' must be a positive integer.", "dimensions")
    return EmbedRequest(inputs, dimensions, base64=fmt == "base64", user=opt_str(body.get("user"), "user"))


def encode_request(req: EmbedRequest, opts: UpstreamOptions) -> dict[str, Any]:
    """Floats are asked for whatever the client wants: the answer is re-encoded anyway."""
    out: dict[str, Any] = {
        "model": opts.model,
        "input": req.inputs[0] if req.single else req.inputs,
        "encoding_format": "float",
    }
    if req.dimensions is not None:
        out["dimensions"] = req.dimensions
    # OpenAI embeddings take no task type nor title: the vector is of the text alone
    # (named in the x-llm-proxy-translation header; README, "Embeddings").
    if req.task_type is not None:
        req.dropped.append("taskType")
    if req.title is not None:
        req.dropped.append("title")
    return out


def decode_response(doc: dict[str, Any]) -> EmbedResponse:
    data = doc.get("data")
    items = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
    items.sort(key=_index)
    usage = doc.get("usage")
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return EmbedResponse([_vector(d.get("embedding")) for d in items], prompt if _is_int(prompt) else None)


def encode_response(resp: EmbedResponse, req: EmbedRequest, ctx: ClientContext) -> dict[str, Any]:
    tokens = resp.prompt_tokens if resp.prompt_tokens is not None else ctx.prompt_estimate
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": pack_base64(v) if req.base64 else v}
            for i, v in enumerate(resp.vectors)
        ],
        "model": ctx.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def pack_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _vector(value: Any) -> list[float]:
    """A vector as floats, whether the upstream sent floats or (ignoring the asked format) base64."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return []
        return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4]))
    if isinstance(value, list):
        return [float(x) for x in value if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return []


def _index(item: dict[str, Any]) -> int:
    index = item.get("index")
    return index if isinstance(index, int) else 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
