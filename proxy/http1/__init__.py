"""A small HTTP/1.1 layer for the hot path: the gateway's front server and its
upstream client, both on asyncio protocols and httptools (the C parser uvicorn uses).

aiohttp stays the framework for everything that is not a model call (admin API,
health, metrics, model lists); see proxy/front.py for how requests are split.
"""
