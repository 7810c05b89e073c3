"""The suite's own layout under pytest-xdist: a module-scoped fixture is built on one worker."""

import os

import pytest


@pytest.fixture(scope="module")
def module_resource() -> object:
    return object()


def test_a_module_fixture_puts_its_module_on_one_worker(request, module_resource):
    group = request.node.get_closest_marker("xdist_group")
    assert group is not None and group.args == (__name__,)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist appends the group to the node id it schedules by: no suffix, no grouping (pytest 9.2
        # with pytest-xdist 3.8 drops it silently).
        assert request.node.nodeid.endswith(f"@{__name__}"), request.node.nodeid
