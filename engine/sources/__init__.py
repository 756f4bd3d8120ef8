"""Data source types: what each one's config holds (and later, how each one syncs)."""
