"""skyferry migrate commands (being written)."""
