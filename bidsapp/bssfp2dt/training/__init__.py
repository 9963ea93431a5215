"""Training: losses, stages (as data) and the LightningModule; the TorchIO data module lives in data.py."""
