"""Request header names with a meaning of their own: what reaches Cloud Storage, and what
the sidecar reads, logs or relies on. No imports: the policy loader reads it too."""

from __future__ import annotations

# Request headers a caller may send on to Cloud Storage; everything else is dropped.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "cache-control",
        "content-md5",
        "content-range",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "range",
        "user-agent",
        "x-goog-api-client",
        "x-goog-gcs-idempotency-token",
        "x-goog-encryption-algorithm",
        "x-goog-encryption-key",
        "x-goog-encryption-key-sha256",
        "x-goog-copy-source-encryption-algorithm",
        "x-goog-copy-source-encryption-key",
        "x-goog-copy-source-encryption-key-sha256",
        "x-goog-hash",
        "x-upload-content-type",
        "x-upload-content-length",
        "x-guploader-no-308",  # Go clients ask for 200 + X-Http-Status-Code-Override instead of 308
    }
)

# More of the caller's headers forwarded on XML API reads (Cloud Storage reads these
# preconditions from headers there; the JSON API's are parameters, decided by the proxy).
XML_READ_HEADERS = FORWARDED_REQUEST_HEADERS | frozenset(
    {"x-goog-if-generation-match", "x-goog-if-metageneration-match"}
)

# Forwarded headers whose value is a comma-separated list (RFC 9110 5.3): repeats are
# joined into one. A repeat of any other forwarded header is ambiguous, so refused.
LIST_REQUEST_HEADERS = frozenset(
    {"accept", "accept-encoding", "cache-control", "if-match", "if-none-match", "x-goog-hash"}
)

# Never an issuer's token header (policy `header:`): a token there would reach Cloud Storage,
# an audit line or a span (user-agent), or change what the request means.
RESERVED_REQUEST_HEADERS = XML_READ_HEADERS | frozenset(
    {
        "authorization",
        "baggage",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "cookie",
        "expect",
        "forwarded",
        "host",
        "traceparent",
        "tracestate",
        "transfer-encoding",
        "x-forwarded-for",
        "x-goog-user-project",
    }
)
