"""cli/demo.py: ``monoquant demo DIR`` writes the demo model's float checkpoint folder."""

from __future__ import annotations

import json

import torch

import monoquant_core as mq
from monoquant_core.demo import demo_model
from tests.helpers import cli_ok, cli_one_line_error, stored, tree


def test_demo_folder_holds_the_demo_weights_and_config(cli, tmp_path):
    out = tmp_path / "model-dir"
    assert "wrote" in cli_ok(cli("demo", out))
    assert tree(out) == {"config.json", "model.safetensors"}
    want = demo_model().state_dict()
    got = stored(out / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((out / "config.json").read_text())
    assert (config["dim"], config["depth"], config["vocab"]) == (256, 4, 2048)


def test_demo_folder_is_a_checkpoint_mode_input(cli, tmp_path, engine):
    src, dst = tmp_path / "model-dir", tmp_path / "model-int8"
    cli_ok(cli("demo", src))
    cli_ok(cli("quantize", src, "-o", dst))
    model = mq.load(str(dst / "model.safetensors"), demo_model(), engine=engine)
    tokens = torch.randint(0, 2048, (1, 16))
    assert mq.sqnr_db(demo_model()(tokens), model(tokens)) > 25.0
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()


def test_existing_folder_needs_overwrite(cli, tmp_path):
    out = tmp_path / "model-dir"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli_one_line_error(cli("demo", out), "already exists", "--overwrite")
    assert tree(out) == {"keep.txt"}
    cli_ok(cli("demo", out, "--overwrite"))
    assert tree(out) == {"config.json", "model.safetensors"}
