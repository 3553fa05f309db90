"""Telemetry for the dashboard and ``clinic-edge status``: sources, the parts they read, and the health verdict."""
