"""Embedded worlds: small models and data the project builds itself, because no model hub is reachable."""
