from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from monoquant_core import Engine
from monoquant_core.cli import build_cli
from monoquant_core.demo import demo_model
from monoquant_core.testing import mlp
from tests.helpers import small_state, write_file


@pytest.fixture
def engine() -> Engine:
    """A fresh Engine with every installed plugin (real entry-point discovery)."""
    return Engine()


@pytest.fixture
def cli(engine):
    """The ``monoquant`` command tree of ``engine``, invoked in-process:
    ``cli("plan", "--demo")`` gives click's result (arguments are turned into strings)."""
    group = build_cli(engine)

    def invoke(*args):
        return CliRunner().invoke(group, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def demo_sd() -> dict[str, torch.Tensor]:
    """The bundled demo model's float state_dict (read-only: do not modify it)."""
    return {k: v.detach().clone() for k, v in demo_model().state_dict().items()}


@pytest.fixture
def small_file(tmp_path):
    """``(path, state_dict)`` of :func:`tests.helpers.small_state` saved as
    ``tmp_path/in/model.safetensors``."""
    sd = small_state()
    src = tmp_path / "in" / "model.safetensors"
    src.parent.mkdir()
    write_file(src, sd, {"format": "pt"})
    return src, sd


@pytest.fixture
def saved(tmp_path, engine):
    """``(path, qmodel)``: the int8 :func:`~monoquant_core.testing.mlp` saved to
    ``tmp_path/q.safetensors``."""
    qmodel, _ = engine.quantize(mlp())
    path = tmp_path / "q.safetensors"
    engine.save(qmodel, str(path))
    return path, qmodel


@pytest.fixture(scope="module")
def single_thread():
    """Many small tensor ops: one thread avoids OpenMP hand-offs on a busy 2-core machine
    (use with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("MONOQUANT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("MONOQUANT_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("MONOQUANT_SLOW_IMPORT_S", raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
