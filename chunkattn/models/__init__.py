"""Models built on chunkattn."""
