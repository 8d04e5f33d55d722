"""Blocking user code (sync functions, expressions) on threads that a run never waits for.

`asyncio.to_thread` uses the loop's default executor, which `asyncio.run` joins on the way out and
whose threads the interpreter joins at exit: a sync function that hangs past its node `timeout`
would keep the whole command from ending. A thread cannot be killed, so a call that outlives its
timeout is abandoned instead: it runs on a daemon thread, its late result is dropped, and the
process ends without it (`processes: N` kills such work outright).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from parallel_agent.conditions import evaluation_cancelled
from parallel_agent.modules.items import describe

T = TypeVar("T")


async def run_in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on a new daemon thread; cancelling the await abandons the call (an
    expression evaluation in it sees `evaluation_cancelled` and stops)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()
    abandoned = threading.Event()
    context.run(evaluation_cancelled.set, abandoned)

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = context.run(function, *args)
        except Exception as exc:
            # A future cannot hold StopIteration (asyncio refuses it, and the await would never
            # end): it becomes a plain error of the call, as in a coroutine.
            error = RuntimeError(describe(exc)) if isinstance(exc, StopIteration) else exc
        except BaseException as exc:  # SystemExit & co from user code end its call, not the run
            error = RuntimeError(describe(exc))
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="pagent-call", daemon=True).start()
    try:
        return await future
    except asyncio.CancelledError:
        abandoned.set()
        raise
