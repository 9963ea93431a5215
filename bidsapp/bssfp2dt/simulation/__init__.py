"""Physics-based phantom simulator: raw BIDS subjects (pc-bSSFP, DWI, T1w) with a known tensor field."""
