"""skyferry provision commands (being written)."""
