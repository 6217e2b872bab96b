"""Test support: a fake-gcs-server subprocess and a recording relay in front of it."""
