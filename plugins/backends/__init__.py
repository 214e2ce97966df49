"""Built-in hardware backends (each its own plugin module)."""
