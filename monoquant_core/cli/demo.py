"""``monoquant demo DIR``: the bundled demo model's float checkpoint, to try checkpoint mode."""

from __future__ import annotations

import json
import os

import click

from ..atomic import atomic_folder
from ..demo import TinyTransformer, demo_model
from ..engine import Engine
from ..errors import UsageError
from ..tables import human_bytes

__all__ = ["add_demo"]


def _config(model: TinyTransformer) -> dict[str, object]:
    block = model.blocks[0]
    return {
        "model": "monoquant demo TinyTransformer",
        "built_by": "monoquant_core.demo:demo_model",
        "vocab": model.embed.num_embeddings,
        "dim": model.embed.embedding_dim,
        "depth": len(model.blocks),
        "heads": block.attn.heads,
        "hidden": block.mlp.fc1.out_features,
        "max_len": model.pos.num_embeddings,
    }


def add_demo(cli: click.Group, engine: Engine) -> None:
    """Add ``demo`` to ``cli``."""

    @cli.command()
    @click.argument("folder", type=click.Path())
    @click.option("--overwrite", is_flag=True, help="Replace FOLDER if it exists.")
    def demo(folder: str, overwrite: bool) -> None:
        """Write the bundled demo model's float weights as a checkpoint folder.

        FOLDER gets model.safetensors (float32 weights of the model `--demo` uses) and
        config.json, the shape of a small Hugging Face checkpoint. Try checkpoint mode on it:
        `monoquant quantize FOLDER -o FOLDER-int8`. Needs no NumPy.
        """
        if not overwrite and os.path.lexists(folder):
            raise UsageError(
                f"output {folder!r} already exists", "pass --overwrite or choose another path"
            )
        model = demo_model()

        def build(tmp: str) -> None:
            engine.save(model, os.path.join(tmp, "model.safetensors"))
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(_config(model), f, indent=2)
                f.write("\n")

        atomic_folder(folder, build, overwrite)
        size = os.path.getsize(os.path.join(folder, "model.safetensors"))
        click.echo(f"wrote {folder} (model.safetensors: {human_bytes(size)} of float32 weights)")
