"""skyferry hosts commands (being written)."""
