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
    recipe, out = make_recipe(tmp_path, tiny_data)
    env = clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    env.update(variables)
    line = one_line_error(msllm("train", recipe, env=env, timeout=120), "train")
    assert message in line, line
    assert not out.exists()
