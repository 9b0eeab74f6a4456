"""A streamed response that writes each burst of events at once.

The engine hands an answer's tokens over a few at a time (``runtime.batch.TEXT_EVERY``), and a
front end turns each into its own event. Starlette's StreamingResponse writes every event on its
own: a system call and a turn of the server's machinery per token per stream, on the cores that
are generating. Here the events a body produces before it has to wait are joined into one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Send


class EventStream(StreamingResponse):
    """StreamingResponse over an async iterator of bytes, one write per burst of events."""

    body_iterator: AsyncIterator[bytes]

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pending: list[bytes] = []
        ready = asyncio.Event()

        async def produce() -> None:
            # runs until the body has to wait; whatever it produced by then goes out in one write
            try:
                async for event in self.body_iterator:
                    pending.append(event)
                    ready.set()
            finally:
                ready.set()

        producer = asyncio.create_task(produce())
        try:
            while True:
                await ready.wait()
                ready.clear()
                if pending:
                    data = b"".join(pending)
                    pending.clear()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if producer.done():
                    break
            producer.result()  # the body's own error, if it failed
        finally:
            producer.cancel()  # a client gone: the body's generators close, freeing the engine's slot
        await send({"type": "http.response.body", "body": b"", "more_body": False})
