import os

# Before anything imports grpc: the tests spawn processes (fork + exec) from a process that
# also runs grpc.aio servers and channels, and grpc's fork handlers can deadlock in fork()
# while grpc threads are busy (seen: uvloop's spawn stuck in grpc's prefork handler). Nothing
# here forks to keep using grpc in the child, so the handlers are of no use.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import uvloop  # noqa: E402


def pytest_asyncio_loop_factories(config, item):
    # The proxy runs on uvloop in production; test on the same loop.
    return {"uvloop": uvloop.new_event_loop}
