"""A minimal, fast OpenAI-compatible streaming server on raw asyncio, for bench tests.

It answers instantly (or with a fixed per-token delay), so what a benchmark measures
against it is the client's own overhead. Run it as a script (``python fake_openai.py
--port 0``; it prints ``fake-openai: listening on http://HOST:PORT``) or in a thread
with :func:`serve_in_thread`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

DIGEST = "sha256:" + "ab" * 32


@dataclass
class FakeOptions:
    """How the fake server behaves."""

    tokens: int = 4  # tokens per completion when the request gives no max_tokens
    delay: float = 0.0  # seconds between streamed tokens
    ready: threading.Event = field(default_factory=threading.Event)
    fail_every: int = 0  # every Nth completion request answers 500 (0: never)
    streaming: int = 0  # completions being streamed now (the server's one event loop updates it)
    peak_streaming: int = 0  # the most streamed at once: proof that a client really overlapped requests


def _response(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _chunk(i: int, text: str, chat: bool) -> bytes:
    if chat:
        choice = f'{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}'
    else:
        choice = f'{{"index":0,"text":"{text}","finish_reason":null}}'
    return f'data: {{"id":"x{i}","object":"chunk","model":"fake","choices":[{choice}]}}\n\n'.encode()


def _tail(n_prompt: int, n_out: int) -> bytes:
    usage = f'{{"prompt_tokens":{n_prompt},"completion_tokens":{n_out},"total_tokens":{n_prompt + n_out}}}'
    return (
        b'data: {"id":"x","object":"chunk","model":"fake","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'
        b"\n\n" + f'data: {{"id":"x","choices":[],"usage":{usage}}}\n\n'.encode() + b"data: [DONE]\n\n"
    )


class _Handler:
    def __init__(self, opts: FakeOptions) -> None:
        self.opts = opts
        self.count = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line[:15].lower() == "content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                await self._route(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        ready = self.opts.ready.is_set()
        if path == "/v1/models":
            data = {"object": "list", "data": [{"id": "fake", "object": "model", "digest": DIGEST, "ready": ready}]}
            writer.write(_response("200 OK", json.dumps(data).encode()))
        elif path in ("/health/live", "/v2/health/live"):
            writer.write(_response("200 OK", b'{"status":"ok"}'))
        elif path in ("/health/ready", "/v2/health/ready") or path.startswith("/v2/models/"):
            status = "200 OK" if ready else "503 Service Unavailable"
            writer.write(_response(status, b'{"status":"%s"}' % (b"ready" if ready else b"loading")))
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            self.count += 1
            if self.opts.fail_every and self.count % self.opts.fail_every == 0:
                writer.write(_response("500 Internal Server Error", b'{"error":{"message":"boom"}}'))
            else:
                self.opts.streaming += 1
                self.opts.peak_streaming = max(self.opts.peak_streaming, self.opts.streaming)
                try:
                    await self._stream(body, path.endswith("chat/completions"), writer)
                finally:
                    self.opts.streaming -= 1
        else:
            writer.write(_response("404 Not Found", b'{"error":{"message":"not found"}}'))
        await writer.drain()

    async def _stream(self, body: bytes, chat: bool, writer: asyncio.StreamWriter) -> None:
        req = json.loads(body)
        n_out = int(req.get("max_tokens") or self.opts.tokens)
        n_prompt = max(1, len(json.dumps(req.get("messages") or req.get("prompt"))) // 4)
        if not self.opts.delay:
            payload = b"".join(_chunk(i, "tok", chat) for i in range(n_out)) + _tail(n_prompt, n_out)
            writer.write(_response("200 OK", payload, "text/event-stream"))
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(n_out):
            await asyncio.sleep(self.opts.delay)
            part = _chunk(i, "tok", chat)
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        part = _tail(n_prompt, n_out)
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(part), part))


async def _serve(opts: FakeOptions, port: int, started: threading.Event | None, box: list[object]) -> None:
    server = await asyncio.start_server(_Handler(opts), "127.0.0.1", port, backlog=1024)
    box.append(server.sockets[0].getsockname()[1])
    box.append(asyncio.get_running_loop())
    box.append(server)
    if started is not None:
        started.set()
    else:
        print(f"fake-openai: listening on http://127.0.0.1:{box[0]}", flush=True)
    async with server:
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            pass


@contextmanager
def serve_in_thread(opts: FakeOptions | None = None) -> Iterator[tuple[str, FakeOptions]]:
    """Run the fake server on a free loopback port in a thread; yield (url, options)."""
    opts = opts or FakeOptions()
    started = threading.Event()
    box: list[object] = []
    thread = threading.Thread(target=asyncio.run, args=(_serve(opts, 0, started, box),), daemon=True)
    thread.start()
    assert started.wait(10), "fake server did not start"
    try:
        yield f"http://127.0.0.1:{box[0]}", opts
    finally:
        loop, server = box[1], box[2]
        loop.call_soon_threadsafe(server.close)  # type: ignore[attr-defined]
        thread.join(5)


@contextmanager
def serve_in_process(*args: str) -> Iterator[str]:
    """Run the fake server as a separate process (its own GIL); yield its URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--port", "0", *args], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0)
    ns = parser.parse_args()
    opts = FakeOptions(tokens=ns.tokens, delay=ns.delay)
    opts.ready.set()
    asyncio.run(_serve(opts, ns.port, None, []))


if __name__ == "__main__":
    main()
