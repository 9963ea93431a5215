"""Command-line entry points (torch is imported lazily so --help and --version stay instant)."""
