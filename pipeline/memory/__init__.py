"""Memory that moves: pre-copy rounds, the target's page store, the convergence policy, hybrid, lazy pages."""
