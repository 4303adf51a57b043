"""A small ASGI backend stand-in for the nginx tests (served by uvicorn).

HTTP under /api/ answers JSON describing the request it received (path, headers, body size,
client address);
/ws echoes WebSocket text messages.
"""

import json


async def app(scope: dict, receive, send) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"echo: {message.get('text')}"})
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    # client: the address uvicorn settled on (after --proxy-headers and FORWARDED_ALLOW_IPS).
    client = (scope.get("client") or ["?"])[0]
    body = json.dumps({"path": scope["path"], "headers": headers, "body_size": size, "client": client}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
