import pytest
import uvloop


@pytest.fixture(scope="session")
def event_loop_policy():
    # The proxy runs on uvloop in production; test on the same loop.
    return uvloop.EventLoopPolicy()
