"""Deployment glue outside the serving package: the container entrypoint (Kubernetes manifests live beside it)."""
