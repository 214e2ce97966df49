"""The contract suites plugin authors subclass (they import pytest).

::

    from monoquant_core.testing.contracts import SchemeContract

    class TestMySchemeContract(SchemeContract):
        scheme = "my-scheme"
        sqnr_floor_db = 20.0

Mono Quant's built-in plugins run these same suites (``tests/testing/``).
"""

from __future__ import annotations

from .backend_contract import BackendContract
from .contract_base import Contract
from .observer_contract import ObserverContract
from .replacer_contract import ReplacerContract
from .scheme_contract import SchemeContract
from .serializer_contract import SerializerContract

__all__ = [
    "BackendContract",
    "Contract",
    "ObserverContract",
    "ReplacerContract",
    "SchemeContract",
    "SerializerContract",
]
