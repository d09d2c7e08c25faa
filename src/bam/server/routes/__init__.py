"""HTTP routes, one module per resource, all under ``/v1``."""
