"""skyferry.providers: where hosts come from (local namespaces, AWS, GCP)."""
