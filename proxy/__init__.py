"""gcs-iap-proxy: an identity-aware Cloud Storage sidecar."""

__version__ = "0.1.0"
