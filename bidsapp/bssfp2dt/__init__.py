"""bssfp2dt: diffusion tensor maps predicted from phase-cycled bSSFP (or T1w) MRI, as a BIDS-App."""
from importlib import metadata as _metadata
from pathlib import Path as _Path


def _read_version() -> str:
    # The repository's `version` file is the single source; an installed wheel carries it as metadata.
    source_file = _Path(__file__).resolve().parents[2] / "version"
    if source_file.is_file():
        return source_file.read_text().strip()
    try:
        return _metadata.version("bssfp2dt")
    except _metadata.PackageNotFoundError:  # pragma: no cover - running from an unpacked tree
        return "0+unknown"


__version__ = _read_version()
