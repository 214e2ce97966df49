"""Imported first by the package: hide torch's one-line warning about a missing NumPy (Mono
Quant never needs NumPy). Imports nothing from the project."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
