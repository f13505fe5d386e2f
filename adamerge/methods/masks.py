"""(being written: see issues 17 and 18)."""
