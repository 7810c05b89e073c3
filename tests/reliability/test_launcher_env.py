"""Issue 32, item 5: a launcher environment with a MASTER_PORT that is not a port or a MASTER_ADDR
that does not resolve is one line, before the process group starts (no traceback, no wait)."""

from __future__ import annotations

import pytest

from fixtures.launch import clean_env
from fixtures.reliability import one_line_error
from fixtures.train import make_recipe, msllm


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"MASTER_PORT": "abc"}, "MASTER_PORT 'abc' is not a port number (1-65535)"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT '99999' is not a port number (1-65535)"),
        ({"MASTER_ADDR": "no-such-host.invalid"}, "MASTER_ADDR 'no-such-host.invalid' does not resolve to an address"),
    ],
)
def test_bad_master_address_or_port_is_one_line(tmp_path, tiny_data, variables, message):
    """Probe class: the launcher's variables (a MASTER_PORT that is not a port, a MASTER_ADDR that
    does not resolve)."""
    recipe, out = make_recipe(tmp_path, tiny_data)
    env = clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    env.update(variables)
    line = one_line_error(msllm("train", recipe, env=env, timeout=120), "train")
    assert message in line, line
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("present", [0, 1])
def test_a_peer_rank_that_never_starts_is_awaited_within_the_bound(tmp_path, tiny_data, present):
    """Probe class: a peer rank that never starts (one rank of a world of 2 started by hand, gloo).
    It waited 60 minutes in silence; now the rank says whom it waits for, where and for how long,
    and at MSLLM_START_TIMEOUT (4 s here) stops with one line naming the missing rank. The line
    comes before the bound by construction (it is printed before each check of the bound)."""
    from fixtures.launch import free_port

    recipe, out = make_recipe(tmp_path, tiny_data)
    port = free_port()
    env = clean_env(
        RANK=str(present),
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MSLLM_START_TIMEOUT="4",
    )
    proc = msllm("train", recipe, env=env, timeout=120)  # a hang guard: the bound is 4 s
    line = one_line_error(proc, "train")
    where = f"127.0.0.1:{port}"
    if present == 0:
        assert f"waiting for 1 more rank(s) at {where} (up to 4 s; set MSLLM_START_TIMEOUT to change)" in proc.stdout
        assert f"rank(s) 1 of 2 did not join the job at {where} within 4 s (MSLLM_START_TIMEOUT)" in line, line
    else:
        expected = f"rank 1: waiting for rank 0 to open the job's store at {where} (up to 4 s; set MSLLM_START_TIMEOUT"
        assert expected in proc.stdout, proc.stdout
        assert f"rank 1: rank 0 did not open the job's store at {where} within 4 s" in line, line
    assert "start " in line and "with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE" in line, line
    assert "Exception raised from" not in proc.stderr  # no C++ stack trace of c10d's connect retries
    assert not out.exists()


def test_a_start_timeout_that_is_not_a_number_is_one_line(tmp_path, tiny_data):
    """Probe class: the launcher's variables (MSLLM_START_TIMEOUT=soon)."""
    recipe, out = make_recipe(tmp_path, tiny_data)
    env = clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    env["MSLLM_START_TIMEOUT"] = "soon"
    line = one_line_error(msllm("train", recipe, env=env, timeout=120), "train")
    assert "MSLLM_START_TIMEOUT 'soon' is not a number of seconds > 0: set it to e.g. 600, or unset it" in line
    assert not out.exists()
