"""The Cloud Storage request surface: requests into operations, operations into upstream requests."""
