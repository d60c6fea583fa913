"""The controller: the migration runner, its stages, the journal, the registry and the agents it talks to."""
