"""Embeddings codecs, meters and the Gemini dialect's embedding pieces, without sockets."""

from __future__ import annotations

import base64
import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ModelConfig, RouteConfig, UpstreamConfig
from proxy.dialects import GEMINI_METHODS, ModelInfo, model_endpoint
from proxy.dialects.gemini import GEMINI
from proxy.errors import InvalidRequest, UnsupportedParameter, UpstreamError
from proxy.handlers import is_embedding_model
from proxy.metering import Usage, meter_for, settle
from proxy.translate import EmbeddingsTranslation, targets, translation_for
from proxy.translate import embed_gemini as gem
from proxy.translate import embed_openai as oai
from proxy.translate.common import ClientContext, UpstreamOptions
from proxy.translate.hub import BadInput, EmbedRequest, EmbedResponse, Untranslatable

pytestmark = pytest.mark.fast

OPENAI_UP = UpstreamConfig("o", "http://x/v1", "openai", "k")
GEMINI_UP = UpstreamConfig("g", "http://x", "gemini", "k")
ANTHROPIC_UP = UpstreamConfig("a", "http://x", "anthropic", "k")


def test_openai_request_shapes() -> None:
    assert oai.decode_request({"input": "a"}).inputs == ["a"]
    assert oai.decode_request({"input": ["a", "b"]}).inputs == ["a", "b"]
    assert oai.decode_request({"input": [1, 2]}).inputs == [[1, 2]]
    assert oai.decode_request({"input": [[1], [2, 3]]}).inputs == [[1], [2, 3]]
    req = oai.decode_request({"input": "a", "dimensions": 8, "encoding_format": "base64", "user": "u"})
    assert (req.dimensions, req.base64, req.user) == (8, True, "u")
    for bad in ({"input": []}, {"input": ["a", 1]}, {"input": 3}, {"input": "a", "encoding_format": "hex"},
                {"input": "a", "dimensions": 0}, {"input": "a", "dimensions": "8"}, {"input": [True]}):
        with pytest.raises(BadInput):
            oai.decode_request(bad)


def test_openai_to_gemini_request() -> None:
    req = oai.decode_request({"input": ["a", "b"], "dimensions": 8, "user": "u"})
    out = gem.encode_request(req, UpstreamOptions("gemini-embedding-001"))
    assert out == {"requests": [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}]}, "outputDimensionality": 8}
        for t in "ab"]}
    assert req.dropped == ["user"]
    with pytest.raises(Untranslatable, match="token ids"):
        gem.encode_request(oai.decode_request({"input": [[1, 2]]}), UpstreamOptions("m"))


def test_gemini_request_shapes() -> None:
    single = gem.decode_request({"content": {"parts": [{"text": "a"}, {"text": "b"}]}, "taskType": "CLUSTERING",
                                 "title": "t", "outputDimensionality": 4})
    assert (single.inputs, single.single, single.task_type, single.title, single.dimensions) == (
        ["a\nb"], True, "CLUSTERING", "t", 4)
    batch = gem.decode_request({"requests": [{"model": "models/m", "content": {"parts": [{"text": t}]}} for t in "ab"]})
    assert (batch.inputs, batch.single) == (["a", "b"], False)
    out = oai.encode_request(single, UpstreamOptions("text-embedding-3-small"))
    assert out == {"model": "text-embedding-3-small", "input": "a\nb", "encoding_format": "float", "dimensions": 4}
    assert single.dropped == ["taskType", "title"]
    assert oai.encode_request(batch, UpstreamOptions("m"))["input"] == ["a", "b"]
    for bad in ({"requests": []}, {"requests": ["x"]}, {"content": "a"}, {"content": {"parts": []}},
                {"content": {"parts": [{"text": "a"}]}, "outputDimensionality": 0}):
        with pytest.raises(BadInput):
            gem.decode_request(bad)
    with pytest.raises(Untranslatable, match="inlineData"):
        gem.decode_request({"content": {"parts": [{"inlineData": {"data": "AA"}}]}})
    with pytest.raises(Untranslatable, match="outputDimensionality"):
        gem.decode_request({"requests": [{"content": {"parts": [{"text": "a"}]}, "outputDimensionality": d} for d in (1, 2)]})


def test_responses_both_ways() -> None:
    ctx = ClientContext("client-model", False, prompt_estimate=9)
    got = gem.decode_response({"embeddings": [{"values": [0.5, 1]}, {"values": [0.25, 0]}], "usageMetadata": {"promptTokenCount": 3}})
    assert got == EmbedResponse([[0.5, 1.0], [0.25, 0.0]], 3)
    assert gem.decode_response({"embedding": {"values": [1.0]}}) == EmbedResponse([[1.0]], None)
    floats = oai.encode_response(got, EmbedRequest(["a", "b"]), ctx)
    assert floats == {"object": "list", "model": "client-model", "usage": {"prompt_tokens": 3, "total_tokens": 3},
                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 1.0]},
                               {"object": "embedding", "index": 1, "embedding": [0.25, 0.0]}]}
    packed = oai.encode_response(EmbedResponse([[0.5, -2.0]]), EmbedRequest(["a"], base64=True), ctx)
    assert struct.unpack("<2f", base64.b64decode(packed["data"][0]["embedding"])) == (0.5, -2.0)
    assert packed["usage"] == {"prompt_tokens": 9, "total_tokens": 9}   # none reported: the estimate

    doc = {"object": "list", "data": [{"index": 1, "embedding": oai.pack_base64([2.0])}, {"index": 0, "embedding": [1]}],
           "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    back = oai.decode_response(doc)
    assert back == EmbedResponse([[1.0], [2.0]], 4)   # index order; base64 decoded
    assert gem.encode_response(back, EmbedRequest(["a", "b"]), ctx) == {
        "embeddings": [{"values": [1.0]}, {"values": [2.0]}], "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4}}
    assert gem.encode_response(EmbedResponse([[1.0]]), EmbedRequest(["a"], single=True), ctx) == {"embedding": {"values": [1.0]}}


def test_translation_seam() -> None:
    assert translation_for("embeddings", OPENAI_UP) is None            # same protocol: byte-exact
    assert translation_for("embedContent", GEMINI_UP) is None
    assert translation_for("embeddings", ANTHROPIC_UP) is None         # the router refuses it first
    assert targets("embeddings") == targets("batchEmbedContents") == frozenset({"openai", "gemini"})
    assert "anthropic" not in targets("embedContent")
    t = translation_for("embeddings", GEMINI_UP)
    assert isinstance(t, EmbeddingsTranslation)
    assert (t.upstream_endpoint(False), t.upstream_query(False)) == ("batchEmbedContents", "")
    body = orjson.loads(t.request({"model": "x", "input": ["a"], "user": "u"}, "gm", False))
    assert body["requests"][0]["model"] == "models/gm" and t.dropped == ["user"]
    ctx = t.context("x", False, 5)
    out = orjson.loads(t.response(b'{"embeddings":[{"values":[1.5]}]}', ctx))
    assert out["data"][0]["embedding"] == [1.5] and out["usage"]["prompt_tokens"] == 5
    with pytest.raises(UpstreamError):   # one vector per input, or the answer is not one
        t.response(b'{"embeddings":[]}', ctx)
    with pytest.raises(UpstreamError):
        t.response(b"[]", ctx)
    with pytest.raises(UnsupportedParameter) as caught:
        t.request({"model": "x", "input": [1, 2]}, "gm", False)
    assert caught.value.code == "untranslatable" and "upstream 'g', protocol gemini" in caught.value.message
    with pytest.raises(InvalidRequest):
        t.request({"model": "x", "input": None}, "gm", False)
    back = translation_for("embedContent", OPENAI_UP)
    assert back is not None and back.upstream_endpoint(False) == "embeddings"


def test_gemini_endpoints_and_retarget() -> None:
    assert {"embedContent", "batchEmbedContents"} <= set(GEMINI_METHODS)
    found = model_endpoint("/v1beta/models/gemini-embedding-001:batchEmbedContents")
    assert found is not None and found[1] == "gemini-embedding-001"
    batch = found[0]
    assert batch.retarget is not None and not batch.can_stream and batch.required == ("requests",)
    body = {"requests": [{"model": "models/e", "content": {}}, {"model": "e", "content": {}}, {"model": "models/z"}]}
    assert batch.retarget(body, "e", "up") == {
        "requests": [{"model": "models/up", "content": {}}, {"model": "models/up", "content": {}}, {"model": "models/z"}]}
    assert batch.retarget({"requests": [{"model": "models/up"}]}, "e", "up") is None   # nothing to change
    assert batch.retarget({"requests": "x"}, "e", "up") is None
    single = GEMINI_METHODS["embedContent"]
    assert single.retarget is not None
    assert single.retarget({"model": "models/e", "content": {}}, "e", "up") == {"model": "models/up", "content": {}}
    assert single.retarget({"content": {}}, "e", "up") is None   # byte-exact: nothing names the model


def test_gemini_model_list_methods() -> None:
    listed = orjson.loads(GEMINI.models_body([ModelInfo("e", "o", 0, embeds=True), ModelInfo("c", "o", 0)], {}))
    assert listed["models"][0]["supportedGenerationMethods"] == ["embedContent", "batchEmbedContents", "countTokens"]
    assert "embedContent" not in listed["models"][1]["supportedGenerationMethods"]
    assert is_embedding_model(ModelConfig("my-vectors", (RouteConfig("o", "text-embedding-3-small"),)))
    assert is_embedding_model(ModelConfig("demo-embedding", (RouteConfig("o", "m"),)))
    assert not is_embedding_model(ModelConfig("gpt", (RouteConfig("o", "gpt-4o"),)))


def test_embedding_meters() -> None:
    vectors = ",".join('{"values":[' + ",".join(["0.125"] * 200) + "]}" for _ in range(10))
    body = ('{"embeddings":[' + vectors + '],"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7,'
            '"promptTokensDetails":[{"modality":"TEXT","tokenCount":7}]}}').encode()
    for name in ("embedContent", "batchEmbedContents"):
        meter = meter_for(name, stream=False)
        for i in range(0, len(body), 999):
            meter.feed(body[i:i + 999])
        meter.finish()
        assert meter.usage() == Usage(prompt_tokens=7) and meter.complete()
    for name, bare in (("batchEmbedContents", b'{"embeddings":[{"values":[0.5]}]}'),
                       ("embeddings", b'{"object":"list","data":[{"embedding":[0.5]}]}')):
        meter = meter_for(name, stream=False)
        meter.feed_body(bare + b" " * 4000)
        # No usage reported: the prompt estimate, flagged, and never output tokens from the vectors.
        assert settle(meter, 11) == (Usage(prompt_tokens=11), True)


# Valid bodies of each dialect: any text, one or several inputs, the optional fields.
_TEXT = st.text(max_size=40)
_OPENAI_BODY = st.fixed_dictionaries(
    {"model": st.just("m"), "input": st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=5))},
    optional={"dimensions": st.integers(1, 3072), "encoding_format": st.sampled_from(["float", "base64"]),
              "user": _TEXT},
)
_CONTENT = st.fixed_dictionaries({"parts": st.lists(st.fixed_dictionaries({"text": _TEXT}), min_size=1, max_size=3)})
_GEMINI_OPTIONS = {"taskType": st.sampled_from(["RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "CLUSTERING"]), "title": _TEXT}
_GEMINI_SINGLE = st.fixed_dictionaries({"content": _CONTENT}, optional={**_GEMINI_OPTIONS, "outputDimensionality": st.integers(1, 3072)})
_GEMINI_BATCH = st.integers(1, 3072).flatmap(lambda dims: st.fixed_dictionaries({"requests": st.lists(
    st.fixed_dictionaries({"model": st.just("models/m"), "content": _CONTENT, "outputDimensionality": st.just(dims)},
                          optional=_GEMINI_OPTIONS), min_size=1, max_size=5)}))
_FLOATS = st.floats(-1, 1, width=32)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(body=st.one_of(_OPENAI_BODY.map(lambda b: ("embeddings", b)), _GEMINI_SINGLE.map(lambda b: ("embedContent", b)),
                      _GEMINI_BATCH.map(lambda b: ("batchEmbedContents", b))),
       dim=st.integers(1, 8), prompt=st.one_of(st.none(), st.integers(0, 10_000)), data=st.data())
def test_no_valid_embeddings_call_makes_a_translator_raise(body: tuple[str, dict[str, object]], dim: int,
                                                          prompt: int | None, data: st.DataObject) -> None:
    """Any valid call translates, and any well-formed upstream answer with one vector per
    input comes back in the caller's shape with those vectors, in order."""
    endpoint, doc = body
    upstream = GEMINI_UP if endpoint == "embeddings" else OPENAI_UP
    t = translation_for(endpoint, upstream)
    assert isinstance(t, EmbeddingsTranslation)
    sent = orjson.loads(t.request(doc, "up-model", False))
    n = len(sent["requests"]) if "requests" in sent else (len(sent["input"]) if isinstance(sent["input"], list) else 1)
    vectors = [data.draw(st.lists(_FLOATS, min_size=dim, max_size=dim)) for _ in range(n)]
    if upstream is GEMINI_UP:
        answer: dict[str, object] = {"embeddings": [{"values": v} for v in vectors]}
        if prompt is not None:
            answer["usageMetadata"] = {"promptTokenCount": prompt}
    else:
        answer = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": prompt or 0, "total_tokens": prompt or 0}}
    out = orjson.loads(t.response(orjson.dumps(answer), t.context("m", False, 3)))
    if endpoint == "embeddings":
        got = [list(struct.unpack(f"<{dim}f", base64.b64decode(d["embedding"]))) if isinstance(d["embedding"], str)
               else d["embedding"] for d in out["data"]]
    elif endpoint == "embedContent":
        got = [out["embedding"]["values"]]
    else:
        got = [e["values"] for e in out["embeddings"]]
    assert got == [pytest.approx(v) for v in vectors]
