"""The host agent: its HTTPS server, what it does on its own host, and each side of a migration."""
