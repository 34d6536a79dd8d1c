"""Where blobs go: the filesystem store here, GCS and OCI registries beside it."""
