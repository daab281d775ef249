"""Gemini embeddings (`models/{m}:embedContent`, `:batchEmbedContents`) ⇄ the hub's
EmbedRequest / EmbedResponse.

    embedContent:       {content: {parts: [{text}]}, taskType?, title?, outputDimensionality?}
                        → {embedding: {values: [...]}}
    batchEmbedContents: {requests: [{model: "models/m", content, taskType?, title?, outputDimensionality?}]}
                        → {embeddings: [{values: [...]}, ...]}
    either answer may carry usageMetadata {promptTokenCount, totalTokenCount}.

Upstream, every call goes as one batchEmbedContents (as google-genai itself sends it):
one request per input, each naming the model as Google requires. A content's text parts
are embedded as one text, joined by newlines; only text is embedded elsewhere.
"""

from __future__ import annotations

from typing import Any

from proxy.translate.common import ClientContext, UpstreamOptions, as_dict, as_list, opt_int, opt_str
from proxy.translate.hub import BadInput, EmbedRequest, EmbedResponse, Untranslatable

PROTOCOL = "gemini"


def decode_request(body: dict[str, Any]) -> EmbedRequest:
    """An embedContent body (`content`) or a batchEmbedContents one (`requests`)."""
    if "requests" in body:
        requests = [as_dict(r, f"requests[{i}]") for i, r in enumerate(as_list(body.get("requests"), "requests"))]
        if not requests:
            raise BadInput("'requests' must not be empty.", "requests")
        names = [f"requests[{i}]" for i in range(len(requests))]
        single = False
    else:
        requests, names, single = [body], [""], True
    inputs: list[str | list[int]] = [_text(r.get("content"), f"{n}.content".lstrip(".")) for r, n in zip(requests, names, strict=True)]
    dims = {opt_int(r.get("outputDimensionality"), "outputDimensionality") for r in requests}
    if len(dims) > 1:
        raise Untranslatable("outputDimensionality (different per request)", "non-Gemini", "one call has one size")
    dimensions = dims.pop()
    if dimensions is not None and dimensions < 1:
        raise BadInput("'outputDimensionality' must be a positive integer.", "outputDimensionality")
    task = next((t for r in requests if (t := opt_str(r.get("taskType"), "taskType")) is not None), None)
    title = next((t for r in requests if (t := opt_str(r.get("title"), "title")) is not None), None)
    return EmbedRequest(inputs, dimensions, single=single, task_type=task, title=title)


def encode_request(req: EmbedRequest, opts: UpstreamOptions) -> dict[str, Any]:
    """One batchEmbedContents body; token ids cannot go (Gemini embeds text only)."""
    model = f"models/{opts.model}"
    requests = []
    for i, text in enumerate(req.inputs):
        if not isinstance(text, str):
            raise Untranslatable(f"input[{i}] (token ids)", PROTOCOL, "Gemini embeds text only; send the text itself")
        request: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
        if req.dimensions is not None:
            request["outputDimensionality"] = req.dimensions
        requests.append(request)
    if req.user is not None:
        req.dropped.append("user")   # an end-user id for abuse monitoring: no Gemini field
    return {"requests": requests}


def decode_response(doc: dict[str, Any]) -> EmbedResponse:
    if isinstance(doc.get("embedding"), dict):
        embeddings: list[Any] = [doc["embedding"]]
    else:
        found = doc.get("embeddings")
        embeddings = found if isinstance(found, list) else []
    vectors = [_floats(e.get("values") if isinstance(e, dict) else None) for e in embeddings]
    meta = doc.get("usageMetadata")
    prompt = meta.get("promptTokenCount") if isinstance(meta, dict) else None
    return EmbedResponse(vectors, prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None)


def encode_response(resp: EmbedResponse, req: EmbedRequest, ctx: ClientContext) -> dict[str, Any]:
    out: dict[str, Any]
    if req.single:
        out = {"embedding": {"values": resp.vectors[0] if resp.vectors else []}}
    else:
        out = {"embeddings": [{"values": v} for v in resp.vectors]}
    if resp.prompt_tokens is not None:
        out["usageMetadata"] = {"promptTokenCount": resp.prompt_tokens, "totalTokenCount": resp.prompt_tokens}
    return out


def _text(content: Any, where: str) -> str:
    parts = as_list(as_dict(content, where).get("parts"), f"{where}.parts")
    if not parts:
        raise BadInput(f"'{where}.parts' must not be empty.", f"{where}.parts")
    texts = []
    for k, part in enumerate(parts):
        text = as_dict(part, f"{where}.parts[{k}]").get("text")
        if not isinstance(text, str):
            keys = ", ".join(sorted(part))[:60]
            raise Untranslatable(f"{where}.parts[{k}] with {keys}", "non-Gemini", "only text is embedded elsewhere")
        texts.append(text)
    return "\n".join(texts)


def _floats(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [float(x) for x in value if isinstance(x, (int, float)) and not isinstance(x, bool)]
