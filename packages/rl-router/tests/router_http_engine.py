"""A trivial engine process speaking SGLang's HTTP shape: /generate, /health_generate, /abort_request.

Run as `python router_http_engine.py --name e0 [--token-delay S] [--health-delay S]`; it binds 127.0.0.1
on a free port and prints `PORT <n>` once listening. `/generate` answers `input_ids` reversed, one
token every `--token-delay` seconds (up to `sampling_params.max_new_tokens`); an `/abort_request` for
its rid (or `abort_all`) makes it answer at once with finish_reason "abort" and the tokens so far.
Standard library only, so the test needs no HTTP package.
"""

from __future__ import annotations

import argparse
import asyncio
import json


class Engine:
    def __init__(self, name: str, token_delay_s: float, health_delay_s: float):
        self.name = name
        self.token_delay_s = token_delay_s
        self.health_delay_s = health_delay_s
        self.aborts: dict[str, asyncio.Event] = {}
        self.served = 0

    async def generate(self, payload: dict) -> dict:
        rid = payload["rid"]
        aborted = self.aborts.setdefault(rid, asyncio.Event())
        source = list(reversed(payload["input_ids"]))
        limit = payload.get("sampling_params", {}).get("max_new_tokens", len(source))
        output: list[int] = []
        finish = {"type": "length", "length": limit}
        try:
            for token in (source * (limit // max(1, len(source)) + 1))[:limit]:
                if self.token_delay_s:
                    try:
                        await asyncio.wait_for(aborted.wait(), self.token_delay_s)
                    except TimeoutError:
                        pass
                if aborted.is_set():
                    finish = {"type": "abort", "message": "Abort request"}
                    break
                output.append(token)
        finally:
            self.aborts.pop(rid, None)
        self.served += 1
        return {
            "text": " ".join(map(str, output)),
            "output_ids": output,
            "meta_info": {"id": rid, "engine": self.name, "finish_reason": finish, "completion_tokens": len(output)},
        }

    def abort(self, payload: dict) -> dict:
        targets = list(self.aborts) if payload.get("abort_all") else [payload.get("rid")]
        for rid in targets:
            if rid in self.aborts:
                self.aborts[rid].set()
        return {"success": True}

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/generate" and method == "POST":
            return 200, await self.generate(json.loads(body))
        if path == "/abort_request" and method == "POST":
            return 200, self.abort(json.loads(body))
        if path == "/health_generate":
            await asyncio.sleep(self.health_delay_s)
            return 200, {"ok": True}
        return 404, {"error": f"no route {method} {path}"}

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    key, _, value = line.decode().partition(":")
                    if key.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                status, answer = await self.route(method, path, body)
                data = json.dumps(answer).encode()
                writer.write(
                    f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--health-delay", type=float, default=0.0)
    args = parser.parse_args()
    engine = Engine(args.name, args.token_delay, args.health_delay)
    server = await asyncio.start_server(engine.serve_connection, "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
