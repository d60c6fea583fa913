"""Container engines (runc, Podman, Docker) behind one Runtime protocol."""
