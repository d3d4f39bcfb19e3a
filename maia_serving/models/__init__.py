"""Models built locally: no model hub is reachable from where this runs."""
