# The Mono Quant test kit: fixtures mq_engine, fake_distribution, tiny_models, assert_sqnr,
# assert_roundtrip_exact and cli_runner.
pytest_plugins = ["monoquant_core.testing.plugin"]
