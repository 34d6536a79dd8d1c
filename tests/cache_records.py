"""Well-formed manifest cache entry bodies over blobs stored in a test store."""

from __future__ import annotations

from typing import Any

from nixery_core.manifest import LayerDescriptor, render_manifest
from nixery_core.protocols import Uploader

LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"


def stored_image_record(
    store: Uploader, label: str = "one"
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Store a one-layer image; return the body BuildResult.to_record() writes, and its blobs."""
    layer = store.put_blob(f"layer of {label}".encode(), LAYER_MEDIA)
    config_bytes = f'{{"label":"{label}"}}'.encode()
    config = store.put_blob(config_bytes, CONFIG_MEDIA)
    diff_id = "sha256:" + "d" * 64
    manifest, media_type = render_manifest(
        config=config,
        layers=[LayerDescriptor(layer.digest, layer.size, LAYER_MEDIA, diff_id)],
        format="oci",
    )
    stored = store.put_blob(manifest, media_type)
    body = {
        "manifest": manifest.decode(),
        "manifest_media_type": media_type,
        "config": config_bytes.decode(),
        "layers": [
            {
                "digest": layer.digest,
                "diff_id": diff_id,
                "size": layer.size,
                "media_type": LAYER_MEDIA,
                "paths": ["/nix/store/" + "a" * 32 + "-" + label],
                "packages": [label],
                "kind": "store",
                "reused": False,
            }
        ],
        "sboms": [],
    }
    return body, (stored.digest, config.digest, layer.digest)
