"""skyferry demo commands (being written)."""
