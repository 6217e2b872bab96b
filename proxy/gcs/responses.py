"""JSON responses from Cloud Storage, reshaped for the caller: links to the proxy, lists filtered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.gcs.operation import Kind, Operation
from proxy.gcs.rawurl import encode_segment

KeepName = Callable[[str], bool]


def object_links(resource: dict[str, Any], origin: str, acted_on: Operation | None = None) -> None:
    """Point selfLink/mediaLink at the proxy, built from the resource's own bucket, name and
    generation, else from those the operation acted on (a caller's `fields` may leave them
    out). `acl` and `owner` go: every object answer was asked for without them (the proxy
    sends `projection=noAcl` or no projection at all; compose has none), and an upstream
    that sends them anyway (fake-gcs-server does) must not show a caller without `admin`
    who holds the object."""
    resource.pop("acl", None)
    resource.pop("owner", None)
    bucket, name = resource.get("bucket"), resource.get("name")
    generation = resource.get("generation")
    if acted_on is not None:
        bucket = bucket if isinstance(bucket, str) else acted_on.bucket
        name = name if isinstance(name, str) else acted_on.object
        if generation is None and acted_on.kind is Kind.GET:  # the one it asked for
            generation = acted_on.param("generation")
    if not isinstance(bucket, str) or not isinstance(name, str):
        resource.pop("selfLink", None)
        resource.pop("mediaLink", None)
        return
    path = f"/b/{encode_segment(bucket)}/o/{encode_segment(name)}"
    if "selfLink" in resource:
        resource["selfLink"] = f"{origin}/storage/v1{path}"
    if "mediaLink" in resource:
        query = (
            f"?generation={encode_segment(str(generation))}&alt=media"
            if generation
            else "?alt=media"
        )
        resource["mediaLink"] = f"{origin}/download/storage/v1{path}{query}"


def reshape_list(body: Any, origin: str, keep: KeepName) -> Any:
    """Drop items and prefixes the caller may not list (defence in depth), fix item links."""
    if not isinstance(body, dict):
        return body
    items = body.get("items")
    if isinstance(items, list):
        kept = [
            item
            for item in items
            if isinstance(item, dict) and isinstance(item.get("name"), str) and keep(item["name"])
        ]
        for item in kept:
            object_links(item, origin)
        body["items"] = kept
    prefixes = body.get("prefixes")
    if isinstance(prefixes, list):
        body["prefixes"] = [p for p in prefixes if isinstance(p, str) and keep(p)]
    return body


def proxied_link(link: str, origin: str) -> str:
    """Any Cloud Storage JSON API link, re-rooted at the proxy."""
    index = link.find("/storage/v1/")
    return origin + link[index:] if index >= 0 else ""


def reshape_acl(body: Any, origin: str) -> Any:
    entries = body.get("items") if isinstance(body, dict) and "items" in body else [body]
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("selfLink"), str):
            entry["selfLink"] = proxied_link(entry["selfLink"], origin)
    return body


def reshape(body: Any, origin: str, keep: KeepName, operation: Operation) -> Any:
    """The caller's view of a JSON answer: every link through the proxy, lists filtered.
    An object answer is one by the operation, not by its `kind`: a caller's `fields` can
    leave that out (a review: `fields=selfLink,mediaLink` kept upstream's links)."""
    kind = operation.kind
    if kind is Kind.LIST:
        return reshape_list(body, origin, keep)
    if kind is Kind.ACL:
        return reshape_acl(body, origin)
    resource = body.get("resource") if kind is Kind.REWRITE and isinstance(body, dict) else body
    if isinstance(resource, dict):
        object_links(resource, origin, operation)
    return body
