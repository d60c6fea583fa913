"""skyferry agent commands (being written)."""
