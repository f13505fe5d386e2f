"""What a run leaves: one run per output directory, its pictures, and reading a finished run back."""
