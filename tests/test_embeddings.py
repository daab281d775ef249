"""Embeddings across dialects (issue 22 item 7): OpenAI /v1/embeddings ⇄ Gemini embedContent /
batchEmbedContents, with the official openai and google-genai SDKs as clients and the mock
provider (over HTTP) as the upstream of each protocol; errors in the caller's dialect; one
usage record per upstream attempt with the upstream's own numbers."""

from __future__ import annotations

import base64
import hashlib
import random
import struct
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from google.genai import errors as genai_errors
from google.genai import types as gtypes

from proxy.config import ModelConfig, RouteConfig
from proxy.mock_upstream import mock_stats, prompt_tokens_for
from tests import _gateway
from tests._gateway import PRICE, Reply, gateway, scripted_upstream  # noqa: F401

EMBED_MODELS = (
    ModelConfig("emb-openai", (RouteConfig("mock", "mock-embedding"),), (), PRICE),
    ModelConfig("emb-gemini", (RouteConfig("mock-gemini", "mock-embedding"),), (), PRICE),
    # Same name upstream: the byte-exact path has nothing to rewrite.
    ModelConfig("mock-embedding", (RouteConfig("mock-gemini", "mock-embedding"),), (), PRICE),
    ModelConfig("up-gemini-embed", (RouteConfig("up-gemini", "gemini-embedding-001"),), (), PRICE),
)


async def _gw(gateway: Any) -> Any:
    # test_config's models (its upstreams are the fixture's own): those, and the embedding ones.
    base = _gateway.test_config(Path("unused"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    return await gateway(models=base.models + EMBED_MODELS)


def _expected(text: str, dim: int = 64) -> list[float]:
    """The mock's deterministic vector for `text` (proxy/mock_upstream._embedding_vector)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rng = random.Random(seed)
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in raw) ** 0.5
    return [x / norm for x in raw]


def _received(gw: Any, suffix: str) -> list[Any]:
    return [r for r in gw.mock_stats[mock_stats].recent if r.path.endswith(suffix)]


def _oai(gw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)


async def _post(gw: Any, path: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with s.post(gw.url + path, data=data, headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, dict(r.headers), await r.read()


# --------------------------------------------------------------------------- OpenAI clients


async def test_openai_sdk_on_gemini_upstream(gateway):
    gw = await _gw(gateway)
    async with _oai(gw) as client:
        # No encoding_format: openai-python asks for base64 and decodes it itself.
        one = await client.embeddings.create(model="emb-gemini", input="hello")
        sent = _received(gw, "/v1beta/models/mock-embedding:batchEmbedContents")[-1]
        upstream = orjson.loads(sent.body)
        assert upstream == {"requests": [{"model": "models/mock-embedding", "content": {"parts": [{"text": "hello"}]}}]}
        assert one.data[0].embedding == pytest.approx(_expected("hello"), abs=1e-6)
        assert one.model == "emb-gemini" and one.usage.prompt_tokens == prompt_tokens_for(sent.body)

        several = await client.embeddings.create(model="emb-gemini", input=["a", "b", "c"], encoding_format="float",
                                                 dimensions=8)
        assert [d.index for d in several.data] == [0, 1, 2]
        assert [d.embedding for d in several.data] == [pytest.approx(_expected(t, 8)) for t in "abc"]
        upstream = orjson.loads(_received(gw, ":batchEmbedContents")[-1].body)
        assert [r["outputDimensionality"] for r in upstream["requests"]] == [8, 8, 8]

    # The wire form of base64: little-endian float32.
    status, _, raw = await _post(gw, "/v1/embeddings", {"model": "emb-gemini", "input": ["x"], "encoding_format": "base64"},
                                 gw.headers())
    assert status == 200
    packed = base64.b64decode(orjson.loads(raw)["data"][0]["embedding"])
    assert list(struct.unpack("<64f", packed)) == pytest.approx(_expected("x"), abs=1e-6)

    recs = await gw.wait_records(3)
    assert [(r.client_dialect, r.upstream_protocol, r.estimated) for r in recs] == [("openai", "gemini", False)] * 3
    assert [r.completion_tokens for r in recs] == [0, 0, 0]
    assert recs[0].prompt_tokens == one.usage.prompt_tokens


async def test_openai_sdk_on_openai_upstream(gateway):
    gw = await _gw(gateway)
    async with _oai(gw) as client:
        b64 = await client.embeddings.create(model="emb-openai", input=["a", "b"])
        floats = await client.embeddings.create(model="emb-openai", input=["a", "b"], encoding_format="float")
    assert [d.embedding for d in b64.data] == [pytest.approx(d.embedding, abs=1e-6) for d in floats.data]
    assert floats.data[1].embedding == pytest.approx(_expected("b"))
    recs = await gw.wait_records(2)
    assert {(r.client_dialect, r.upstream_protocol, r.endpoint) for r in recs} == {("openai", "openai", "embeddings")}


async def test_openai_errors(gateway):
    gw = await _gw(gateway)
    async with _oai(gw) as client:
        # Token ids cannot go to Gemini: a 400 naming the feature and the upstream, nothing sent.
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="emb-gemini", input=[[1, 2, 3]])
        err = caught.value.body
        assert err["code"] == "untranslatable" and err["param"] == "input"
        assert "token ids" in err["message"] and "mock-gemini" in err["message"] and "gemini" in err["message"]
        assert not _received(gw, ":batchEmbedContents")
        # Anthropic has no embeddings API.
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="mock-claude", input="x")
        assert caught.value.body["code"] == "dialect_mismatch" and "anthropic" in caught.value.body["message"]
        # Gemini's own refusal (more inputs than one batch takes), in OpenAI's shape.
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="emb-gemini", input=["x"] * 101)
        assert "at most 100" in caught.value.body["message"] and caught.value.body["code"] == "upstream_invalid_request"
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model="emb-gemini", input="x", encoding_format="hex")  # type: ignore[arg-type]
    status, _, raw = await _post(gw, "/v1/embeddings", {"model": "emb-gemini", "input": "x", "stream": True}, gw.headers())
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "stream"
    # Only the 101-input call went upstream: the calls refused before leave no record.
    recs = await gw.wait_records(1)
    assert [(r.status, r.upstream_protocol) for r in recs] == [(400, "gemini")]


async def test_gemini_upstream_without_usage_is_estimated(gateway):
    gw = await _gw(gateway)
    vectors = {"embeddings": [{"values": [0.5, -0.25]}, {"values": [1.0, 0.0]}]}
    gw.upstream.script(Reply(headers={"Content-Type": "application/json"}, chunks=[orjson.dumps(vectors)]))
    async with _oai(gw) as client:
        got = await client.embeddings.create(model="up-gemini-embed", input=["a", "b"])
    assert [d.embedding for d in got.data] == [[0.5, -0.25], [1.0, 0.0]]
    assert gw.upstream.received[-1].path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    (rec,) = await gw.wait_records(1)
    assert rec.estimated and rec.completion_tokens == 0
    assert got.usage.prompt_tokens == rec.prompt_tokens > 0   # the same estimate, answered and recorded


# --------------------------------------------------------------------------- Gemini clients


@pytest.mark.parametrize("version", ["v1beta", "v1"])
async def test_genai_sdk_on_gemini_upstream(gateway, genai_client, version):
    gw = await _gw(gateway)
    client = genai_client(gw, version)
    one = await client.models.embed_content(model="emb-gemini", contents="hello")
    assert one.embeddings is not None and one.embeddings[0].values == pytest.approx(_expected("hello"))
    # The client's model name differs upstream: each batch request is made to name the route's.
    sent = _received(gw, "/v1beta/models/mock-embedding:batchEmbedContents")[-1]
    assert [r["model"] for r in orjson.loads(sent.body)["requests"]] == ["models/mock-embedding"]
    config = gtypes.EmbedContentConfig(output_dimensionality=8, task_type="RETRIEVAL_DOCUMENT", title="doc")
    two = await client.models.embed_content(model="mock-embedding", contents=["a", "b"], config=config)
    assert two.embeddings is not None and [e.values for e in two.embeddings] == [pytest.approx(_expected(t, 8)) for t in "ab"]
    assert two.usage_metadata is not None and two.usage_metadata.prompt_token_count == prompt_tokens_for(
        _received(gw, ":batchEmbedContents")[-1].body)
    recs = await gw.wait_records(2)
    assert {(r.client_dialect, r.upstream_protocol, r.endpoint, r.estimated) for r in recs} == {
        ("gemini", "gemini", "batchEmbedContents", False)}


async def test_gemini_same_dialect_is_byte_exact(gateway):
    gw = await _gw(gateway)
    headers = {"x-goog-api-key": gw.key}
    body = b'{ "content": {"parts": [{"text": "a"}, {"text": "b"}]},  "taskType": "RETRIEVAL_QUERY" }'
    status, _, raw = await _post(gw, "/v1beta/models/mock-embedding:embedContent", body, headers)
    assert status == 200 and orjson.loads(raw)["embedding"]["values"] == pytest.approx(_expected("a\nb"))
    assert _received(gw, ":embedContent")[-1].body == body
    batch = (b'{"requests": [{"model": "models/mock-embedding", "content": {"parts": [{"text": "a"}]}, '
             b'"taskType": "CLUSTERING"}]}')
    status, _, raw = await _post(gw, "/v1/models/mock-embedding:batchEmbedContents", batch, headers)
    assert status == 200 and len(orjson.loads(raw)["embeddings"]) == 1
    assert _received(gw, ":batchEmbedContents")[-1].body == batch
    # Under another name upstream, only a body naming the client's model changes.
    named = {"model": "models/emb-gemini", "content": {"parts": [{"text": "a"}]}}
    status, _, raw = await _post(gw, "/v1beta/models/emb-gemini:embedContent", named, headers)
    assert status == 200 and orjson.loads(_received(gw, ":embedContent")[-1].body)["model"] == "models/mock-embedding"
    # The mock's own checks reach the caller as they are (same dialect).
    status, _, raw = await _post(gw, "/v1beta/models/mock-embedding:batchEmbedContents", {"requests": [
        {"model": "models/other", "content": {"parts": [{"text": "a"}]}}]}, headers)
    assert status == 400 and orjson.loads(raw)["error"]["status"] == "INVALID_ARGUMENT"


async def test_genai_sdk_on_openai_upstream(gateway, genai_client):
    gw = await _gw(gateway)
    client = genai_client(gw)
    one = await client.models.embed_content(model="emb-openai", contents="hello")
    assert one.embeddings is not None and one.embeddings[0].values == pytest.approx(_expected("hello"))
    sent = _received(gw, "/v1/embeddings")[-1]
    assert orjson.loads(sent.body) == {"model": "mock-embedding", "input": ["hello"], "encoding_format": "float"}
    assert one.usage_metadata is not None and one.usage_metadata.prompt_token_count == prompt_tokens_for(sent.body)
    config = gtypes.EmbedContentConfig(output_dimensionality=8)
    several = await client.models.embed_content(model="emb-openai", contents=["a", "b", "c"], config=config)
    assert several.embeddings is not None
    assert [e.values for e in several.embeddings] == [pytest.approx(_expected(t, 8)) for t in "abc"]
    assert orjson.loads(_received(gw, "/v1/embeddings")[-1].body)["dimensions"] == 8

    # embedContent (one content, its parts joined) answers Gemini's single shape; taskType
    # and title have no OpenAI field: dropped and named in the translation header.
    headers = {"x-goog-api-key": gw.key}
    body = {"content": {"parts": [{"text": "a"}, {"text": "b"}]}, "taskType": "RETRIEVAL_DOCUMENT", "title": "t"}
    status, got_headers, raw = await _post(gw, "/v1beta/models/emb-openai:embedContent", body, headers)
    assert status == 200 and orjson.loads(raw)["embedding"]["values"] == pytest.approx(_expected("a\nb"))
    assert orjson.loads(_received(gw, "/v1/embeddings")[-1].body)["input"] == "a\nb"
    assert got_headers["x-llm-proxy-translation"] == "dropped=taskType,title"

    recs = await gw.wait_records(3)
    assert [(r.client_dialect, r.upstream_protocol, r.endpoint, r.estimated) for r in recs] == [
        ("gemini", "openai", "batchEmbedContents", False)] * 2 + [("gemini", "openai", "embedContent", False)]
    assert [r.prompt_tokens for r in recs[:1]] == [one.usage_metadata.prompt_token_count]


async def test_genai_errors(gateway, genai_client):
    gw = await _gw(gateway)
    client = genai_client(gw)
    with pytest.raises(genai_errors.ClientError) as caught:   # Anthropic has no embeddings API
        await client.models.embed_content(model="mock-claude", contents="x")
    assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
    assert "anthropic" in (caught.value.message or "")
    headers = {"x-goog-api-key": gw.key}
    image = {"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}}
    status, _, raw = await _post(gw, "/v1beta/models/emb-openai:embedContent", image, headers)
    err = orjson.loads(raw)["error"]
    assert status == 400 and err["status"] == "INVALID_ARGUMENT" and "inlineData" in err["message"]
    mixed = {"requests": [{"model": "models/emb-openai", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": d}
                          for d in (8, 16)]}
    status, _, raw = await _post(gw, "/v1beta/models/emb-openai:batchEmbedContents", mixed, headers)
    assert status == 400 and "outputDimensionality" in orjson.loads(raw)["error"]["message"]
    status, _, raw = await _post(gw, "/v1beta/models/emb-openai:embedContent", {"title": "t"}, headers)
    assert status == 400 and "content" in orjson.loads(raw)["error"]["message"]
    assert not _received(gw, "/v1/embeddings")   # nothing reached the upstream
    # The upstream's own 400 (dimensions out of the mock's range), in Gemini's shape.
    with pytest.raises(genai_errors.ClientError) as caught:
        await client.models.embed_content(model="emb-openai", contents="x",
                                          config=gtypes.EmbedContentConfig(output_dimensionality=9000))
    assert caught.value.code == 400 and "dimensions" in (caught.value.message or "")


async def test_gemini_list_names_embedding_methods(gateway, genai_client):
    gw = await _gw(gateway)
    models = {m.name: m for m in [m async for m in await genai_client(gw).models.list()]}
    for name in ("models/emb-openai", "models/emb-gemini", "models/mock-embedding"):
        assert models[name].supported_actions == ["embedContent", "batchEmbedContents", "countTokens"]
    assert "embedContent" not in (models["models/mock-gemini"].supported_actions or [])


async def test_limits_reserve_no_output_for_embeddings(gateway, genai_client):
    """A key whose tpm is below the default max_tokens (4096) still embeds: an embedding has
    no output tokens to reserve; it was refused as one that could never be admitted."""
    gw = await _gw(gateway)
    key = await gw.create_key("small", tpm=1000)
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        got = await client.embeddings.create(model="emb-gemini", input="hello")
        assert len(got.data[0].embedding) == 64
        with pytest.raises(openai.RateLimitError):   # a chat call still reserves its max_tokens
            await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}])
    gw.key = key
    one = await genai_client(gw).models.embed_content(model="emb-openai", contents="hello")
    assert one.embeddings is not None
