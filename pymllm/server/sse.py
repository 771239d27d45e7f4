"""Server-sent events: ``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``.

A streamed reply starts only after the first engine chunk arrived (so a rejected request is
still a plain 400); from then on, each engine chunk is rendered to events, and the engine
requests are aborted when the client goes away or the stream fails.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable, Iterable, List, Tuple

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from pymllm.engine.io_struct import RequestOutput
from pymllm.server.errors import OpenAIError
from pymllm.server.generation import ClientDisconnected, DisconnectWatcher, SubRequestGroup

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"

# Render one engine chunk (choice index, chunk) as zero or more SSE events.
RenderChunk = Callable[[int, RequestOutput], Iterable[str]]
# Events after the last choice finished (the usage chunk, ...).
RenderEnd = Callable[[], Iterable[str]]


def sse(payload: Any) -> str:
    """One event; ``payload`` is a response model or a plain dict."""
    if hasattr(payload, "model_dump_json"):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


class SSEResponse(StreamingResponse):
    """Ends its engine requests deterministically, however the response ends: servers report
    a gone client by cancellation or by an OSError on send depending on the ASGI version, and
    a response cancelled before its first event never even starts its generator."""

    def __init__(self, content: AsyncIterator[str], group: SubRequestGroup) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._group.close()


async def first_chunk(request: Request, group: SubRequestGroup) -> Tuple[int, RequestOutput]:
    """Wait for the first chunk; a rejection or full queue raises before any byte is sent."""
    watcher = DisconnectWatcher(request)
    try:
        return await watcher.run(group.next())
    except BaseException:
        await group.close()
        raise
    finally:
        watcher.close()


async def event_stream(
    request: Request,
    group: SubRequestGroup,
    first: Tuple[int, RequestOutput],
    start_events: List[str],
    render: RenderChunk,
    end: RenderEnd,
) -> AsyncIterator[str]:
    watcher = DisconnectWatcher(request)
    try:
        for event in start_events:
            yield event
        for event in render(*first):
            yield event
        while not group.done:
            index, out = await watcher.run(group.next())
            for event in render(index, out):
                yield event
        for event in end():
            yield event
        yield DONE
    except ClientDisconnected:
        return
    except OpenAIError as exc:
        # Headers are gone already: report in-band, as OpenAI does.
        yield sse(exc.to_dict())
        yield DONE
    except Exception as exc:
        logger.exception("stream failed")
        yield sse(OpenAIError(500, f"internal server error: {type(exc).__name__}").to_dict())
        yield DONE
    finally:
        watcher.close()  # the SSEResponse closes the group (aborting what still runs)
