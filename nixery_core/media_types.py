"""Media types of image manifests, indexes, configs and layers (OCI and Docker).

Layers are stored under their OCI media type; a Docker schema 2 manifest
maps them with :func:`docker_layer_media_type`.  :func:`validate_media_type`
checks the RFC 6838 grammar the OCI descriptor schema uses.
"""

from __future__ import annotations

import re

from nixery_core.errors import InvalidInput

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_TAR",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "IMAGE_MANIFEST_TYPES",
    "INDEX_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "OCTET_STREAM",
    "docker_layer_media_type",
    "validate_media_type",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
#: Uncompressed Docker layers: not in the schema 2 text, but Docker and
#: containerd accept and produce it.
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

#: What a blob is when nothing better is known.
OCTET_STREAM = "application/octet-stream"

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)

_OCI_TO_DOCKER_LAYER = {
    OCI_LAYER_GZIP: DOCKER_LAYER_GZIP,
    OCI_LAYER_TAR: DOCKER_LAYER_TAR,
    DOCKER_LAYER_GZIP: DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR: DOCKER_LAYER_TAR,
}


def validate_media_type(value: object) -> str:
    """Return ``value`` if it is a ``type/subtype`` media type, else raise InvalidInput."""
    if not isinstance(value, str) or _MEDIA_TYPE.fullmatch(value) is None:
        raise InvalidInput(f"invalid media type {value!r}: expected 'type/subtype'")
    return value


def docker_layer_media_type(media_type: str) -> str:
    """The Docker schema 2 layer type for a stored (OCI) layer type.

    Docker schema 2 has no zstd layer type: a zstd layer can only be served
    in an OCI manifest, so it raises :class:`~nixery_core.errors.InvalidInput`.
    """
    try:
        return _OCI_TO_DOCKER_LAYER[media_type]
    except KeyError:
        raise InvalidInput(
            f"layer media type {media_type!r} has no Docker schema 2 equivalent; "
            "use the OCI manifest format"
        ) from None
