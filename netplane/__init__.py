"""skyferry.netplane: the WireGuard overlay, container addresses and route cutover."""

from pyroute2 import config as _pyroute2_config

# pyroute2 forks a helper per network namespace it works in, and stops it with SIGTERM. By default the
# helper keeps its parent's signal handlers, so a parent that handles SIGTERM (the agent, `skyferry
# bench`) would run that handler inside the helper: `bench`'s ran the teardown there and took down the
# live mesh. This makes the helpers reset SIGTERM to the default first.
_pyroute2_config.disable_mp_signal = True
