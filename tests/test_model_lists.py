"""Model lists per dialect (issue 22 item 6): each SDK's list holds every model the key may
call (routes of any protocol are reachable by translation), in that SDK's own shape; the
official openai, anthropic and google-genai (v1beta and v1) clients read it."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from tests._gateway import gateway, scripted_upstream  # noqa: F401

MIXED = {"mock-gpt", "mock-claude", "mock-gemini"}   # openai, anthropic and gemini upstreams


async def _lists(gw, key):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        oa = [m async for m in client.models.list()]
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        an = [m async for m in client.models.list()]
    out = {"openai": oa, "anthropic": an}
    for version in ("v1beta", "v1"):
        client = genai.Client(api_key=key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version=version))
        out[version] = [m async for m in await client.aio.models.list()]
    return out


async def test_every_sdk_lists_models_of_every_protocol(gateway):
    gw = await gateway()
    lists = await _lists(gw, gw.key)
    assert MIXED <= {m.id for m in lists["openai"]}
    assert MIXED <= {m.id for m in lists["anthropic"]}
    for version in ("v1beta", "v1"):
        assert {f"models/{n}" for n in MIXED} <= {m.name for m in lists[version]}
        gem = next(m for m in lists[version] if m.name == "models/mock-claude")
        assert gem.supported_actions == ["generateContent", "streamGenerateContent", "countTokens"]
    assert lists["openai"][0].object == "model" and lists["anthropic"][0].type == "model"


async def test_lists_hold_only_the_keys_models(gateway):
    gw = await gateway()
    key = await gw.create_key("two", models=("mock-claude", "mock-gemini"))
    lists = await _lists(gw, key)
    assert [m.id for m in lists["openai"]] == ["mock-claude", "mock-gemini"]
    assert [m.id for m in lists["anthropic"]] == ["mock-claude", "mock-gemini"]
    assert [m.name for m in lists["v1"]] == ["models/mock-claude", "models/mock-gemini"]
    assert [m.name for m in lists["v1beta"]] == ["models/mock-claude", "models/mock-gemini"]


async def test_get_one_model_in_each_shape(gateway):
    gw = await gateway()
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0) as client:
        m = await client.models.retrieve("mock-claude")
        assert m.id == "mock-claude" and m.object == "model"
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0) as client:
        a = await client.models.retrieve("mock-gpt")
        assert a.id == "mock-gpt" and a.type == "model"
    for version in ("v1beta", "v1"):
        client = genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version=version))
        g = await client.aio.models.get(model="mock-gpt")
        assert g.name == "models/mock-gpt"


async def test_v1_list_with_key_in_query_is_geminis(gateway):
    gw = await gateway()
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + f"/v1/models?key={gw.key}") as r:
            assert r.status == 200
            assert "models/mock-gpt" in [m["name"] for m in (await r.json())["models"]]
        async with s.get(gw.url + "/v1/models?key=wrong") as r:   # refused in Gemini's shape
            assert r.status == 401 and (await r.json())["error"]["status"] == "UNAUTHENTICATED"
