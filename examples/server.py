"""A long-running server: answers requests until SIGINT or SIGTERM, then shuts down gracefully.

Each incoming connection gets its own task; each request is answered in upper case. On a
signal the server stops accepting, tells every connected peer why it is closing (the peer's
``recv()`` raises ``ConnectionClosed`` with that reason), waits for the handlers to finish and
exits 0. A handler's error is logged and ends that connection only.

Run: python examples/server.py [--listen HOST:PORT]    (stop it with Ctrl-C or kill)
Then, from another shell: qp2p send HOST:PORT hello --request
"""

import argparse
import asyncio
import contextlib
import logging
import signal

import qp2p

logger = logging.getLogger("server")
SHUTDOWN_REASON = "server shutting down"


async def handle(conn: qp2p.Connection) -> None:
    """Serve one peer until it (or the server) closes the connection."""
    with contextlib.suppress(qp2p.ConnectionClosed):
        async for msg in conn:
            if msg.is_request:
                await msg.reply(msg.payload.upper())


async def serve(listen: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handlers: set[asyncio.Task[None]] = set()
    served = 0

    async with qp2p.Endpoint.bind(listen) as ep:
        print(f"listening on {ep.local_addr[0]}:{ep.local_addr[1]}, peer id {ep.peer_id}",
              flush=True)

        async def accept_loop() -> None:
            nonlocal served
            async for conn in ep.incoming():
                served += 1
                logger.info("connection from %s", conn.remote_addr)
                task = asyncio.ensure_future(handle(conn))
                handlers.add(task)
                task.add_done_callback(handlers.discard)
                task.add_done_callback(_log_failure)

        acceptor = asyncio.ensure_future(accept_loop())
        await stop.wait()
        print("signal received: closing connections", flush=True)
        acceptor.cancel()
        for conn in ep.connections():  # every peer learns why
            await conn.close(SHUTDOWN_REASON)
        await asyncio.gather(*handlers, return_exceptions=True)
    print(f"stopped after serving {served} connection(s)", flush=True)
    return 0


def _log_failure(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("handler failed: %r", task.exception())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: a free port)")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # this program's own log; the libraries' stay at WARNING
    return asyncio.run(serve(args.listen))


if __name__ == "__main__":
    raise SystemExit(main())
