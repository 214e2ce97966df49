"""``python -m monoquant_core ...`` runs the ``monoquant`` command line."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
