"""Reading BIDS inputs, naming and writing BIDS(-Derivatives) files."""
