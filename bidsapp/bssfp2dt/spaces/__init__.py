"""Output spaces: TemplateFlow templates (offline-seeded) and the normalisation of the outputs to them."""
