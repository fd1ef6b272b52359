import os

# Before anything imports grpc: the tests spawn processes (fork + exec) from a process that
# also runs grpc.aio servers and channels, and grpc's fork handlers can deadlock in fork()
# while grpc threads are busy (seen: uvloop's spawn stuck in grpc's prefork handler). Nothing
# here forks to keep using grpc in the child, so the handlers are of no use.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import uvloop  # noqa: E402


def pytest_asyncio_loop_factories(config, item):
    # The proxy runs on uvloop in production; test on the same loop.
    return {"uvloop": _new_loop}



import gc  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import meshproxy  # noqa: E402

PACKAGE = str(Path(meshproxy.__file__).parent)
LOOP_ERRORS: list[dict] = []


def _in_meshproxy(context: dict) -> bool:
    """Whether an error the loop caught came from meshproxy's code, devtools included (a task or
    callback of its whose exception nobody handled: a request can hang on such a bug), not from
    a server a test wrote itself."""
    exc = context.get("exception")
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(PACKAGE):
            return True
        tb = tb.tb_next
    task = context.get("task") or context.get("future")
    coro = getattr(task, "get_coro", lambda: None)()
    return getattr(getattr(coro, "cr_code", None), "co_filename", "").startswith(PACKAGE)


def _record(loop, context):
    if _in_meshproxy(context):
        LOOP_ERRORS.append(context)
    loop.default_exception_handler(context)


class _InternalErrors(logging.Handler):
    """Records the REST listener's "internal error" log lines: a bug it answered with a 500."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR and record.exc_info:
            LOOP_ERRORS.append({"message": record.getMessage(), "exception": record.exc_info[1]})


logging.getLogger("meshproxy.ingress.http").addHandler(_InternalErrors())


def _new_loop():
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(_record)
    return loop


def _reported() -> list[str]:
    errors = [f"{c.get('message')}: {c.get('exception')!r}" for c in LOOP_ERRORS]
    LOOP_ERRORS.clear()
    return errors


@pytest.fixture(autouse=True)
def no_unhandled_errors_in_meshproxy_callbacks():
    """Fail a test in which meshproxy's code raised in a loop callback and nothing handled it
    (a request can hang on such a bug; found: a connect task raising, which left its request
    waiting out the route timeout), or the REST listener answered a bug of its own with a 500.
    What was recorded between tests (a task collected then) counts against the next one."""
    yield
    errors = _reported()
    assert not errors, errors


def pytest_sessionfinish(session, exitstatus):
    """A task's exception that nobody retrieved is reported when the task is collected, often
    after its test: collect once at the end (a collection per test costs 30 s) and fail the run
    on any that came from meshproxy's code."""
    gc.collect()
    errors = _reported()
    if errors:
        session.config.get_terminal_writer().line(
            "unhandled errors in meshproxy tasks:\n  " + "\n  ".join(errors), red=True)
        if session.exitstatus == pytest.ExitCode.OK:  # an interrupted or broken run says so itself
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
