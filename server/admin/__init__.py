"""Administration: adapters, tenants and keys, exports, the cluster view, usage."""
