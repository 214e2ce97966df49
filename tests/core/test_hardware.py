"""hardware.py: ``monoquant env`` data (versions, CPU, GPUs, and which backends run here)."""

from __future__ import annotations

import platform

import torch

import monoquant_core as mq
from monoquant_core import Engine, hookimpl
from monoquant_core.hardware import environment
from tests.helpers import FakeGpuBackend, RaisingBackend


class Flaky:
    @hookimpl
    def monoquant_register_backends(self, register):
        register(FakeGpuBackend())
        register(RaisingBackend())


def test_environment_reports_versions_and_every_backend_best_first():
    engine = Engine(plugins=[Flaky()])
    env = environment(engine.registries)
    assert env["monoquant"] == mq.__version__ and env["torch"] == torch.__version__
    assert env["python"] == platform.python_version()
    assert env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if not torch.cuda.is_available():
        assert env["cuda"] == "no" and env["gpus"] == ["none"]
    rows = {b["name"]: b for b in env["backends"]}
    assert set(rows) == set(engine.backends.names())
    priorities = [b["priority"] for b in env["backends"]]
    assert priorities == sorted(priorities, reverse=True)
    assert rows["reference"]["available"] == "yes"
    assert rows["reference"]["devices"] == list(engine.backends.get("reference").device_types)
    assert rows["fake-gpu"]["available"] == "no: no CUDA device found"
    assert rows["raising"]["available"] == "no: available() raised OSError: driver exploded"
    assert rows["fake-gpu"]["plugin"] == "flaky"
    assert rows["torch-cpu"]["numerics"] == engine.backends.get("torch-cpu").capabilities.numerics
