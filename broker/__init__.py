"""Redis plumbing shared by the API and the workers: connections, key names, wire messages."""
