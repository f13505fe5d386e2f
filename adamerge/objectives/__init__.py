"""Training objectives for learned coefficients: entropy (AdaMerging), alignment with each expert (Expert Merging)."""
