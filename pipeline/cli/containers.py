"""skyferry containers commands (being written)."""
