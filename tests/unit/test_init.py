"""msllm.models.init.parameters_on_meta: models are built on the meta device from several threads at
once (python -m lab bytes loads trained models in its worker threads), so the patch it installs must
act in its own thread only and be gone once every thread has left."""

from __future__ import annotations

import threading

from torch import nn

from msllm.models.init import parameters_on_meta

ORIGINAL = nn.Module.register_parameter


def test_overlapping_threads_build_on_meta_only_inside_and_leave_no_patch_behind():
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    devices = {}

    def first():
        with parameters_on_meta():
            a_inside.set()
            b_inside.wait(10)
            devices["a"] = nn.Linear(2, 2).weight.device.type
        a_left.set()

    def second():
        a_inside.wait(10)
        with parameters_on_meta():
            b_inside.set()
            a_left.wait(10)  # the first thread left while this one is still inside
            devices["b"] = nn.Linear(2, 2).weight.device.type

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    b_inside.wait(10)
    devices["outside, meanwhile"] = nn.Linear(2, 2).weight.device.type  # this thread is not inside
    for t in threads:
        t.join(10)
    assert devices == {"a": "meta", "b": "meta", "outside, meanwhile": "cpu"}
    assert nn.Module.register_parameter is ORIGINAL
    assert nn.Linear(2, 2).weight.device.type == "cpu"
