"""Local stand-ins for an OIDC issuer and the metadata server, speaking the real protocols."""
