"""skyferry doctor commands (being written)."""
