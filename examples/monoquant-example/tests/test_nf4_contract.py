"""nf4 passes Mono Quant's scheme contract suite."""

from monoquant_core.testing import SchemeContract


class TestNf4Contract(SchemeContract):
    scheme = "nf4"
    sqnr_floor_db = 19.0  # the tiny models' weights measure about 20.6 dB at g64
    distributions = ("monoquant-example",)  # leave other installed plugins out
