import asyncio, socket
import aiohttp

async def raw(gw, req: bytes) -> bytes:
    host, port = gw.url.removeprefix("http://").split(":")
    r, w = await asyncio.open_connection(host, int(port))
    w.write(req)
    await w.drain()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data

async def test_x(gateway):
    gw = await gateway()
    gw.audit = False
    body = b'{"model":"mock-gpt","messages":[]}'
    for path in ["/admin/../v1/chat/completions", "/admin/%2e%2e/v1/chat/completions", "/admin/%2E%2E/v1/chat/completions", "/v1/../admin/keys", "//v1/chat/completions", "/admin/..%2fv1/chat/completions", "/healthz/../v1/chat/completions"]:
        req = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        out = await raw(gw, req)
        print(path, out[:300])
    k = "sk-" + "A"*43
    for hdr in [b"Authorization: Bearer " + k.encode() + b"\x00x", b"Authorization: Bearer " + b"Z"*9000, b"x-api-key: " + b"Q"*8100]:
        req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + hdr + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        out = await raw(gw, req)
        print(hdr[:30], out[:600])
