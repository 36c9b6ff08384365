"""A TCP proxy that adds latency: every request reaches the server ``--delay-ms`` later.

This machine's kernel has no ``netem``, so the 20 ms of issue 10's benchmark (d) come
from here: ``python -m bench.delayproxy --listen 127.0.0.1:9000 --upstream
127.0.0.1:8333 --delay-ms 20``. Each chunk a client sends is held ``delay`` after it
arrived, then written to the server in order (a one-way delay on the way in, as netem
on the client's link would add); the server's answers pass through at once
(``--both`` delays them too). Opening the server connection waits ``delay`` too.

It prints ``LISTENING <port>`` when ready (``--listen HOST:0`` picks a free port) and
runs until killed. ``--delay-ms`` of minutes makes a store that never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            chunk = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, chunk))
            if not chunk:
                break
        await sender
    except (ConnectionError, asyncio.CancelledError):
        sender.cancel()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], delay: float, both: bool):
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        try:
            u_reader, u_writer = await asyncio.open_connection(*upstream)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(
            _pump(c_reader, u_writer, delay),
            _pump(u_reader, c_writer, delay if both else 0.0),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, *listen)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.delayproxy", description=__doc__)
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (0: free)")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--both", action="store_true", help="delay answers too")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.listen, args.upstream, args.delay_ms / 1000.0, args.both))


if __name__ == "__main__":
    main()
