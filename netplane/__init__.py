"""skyferry.netplane: the WireGuard overlay, container addresses and route cutover."""
