"""The model registry: names, content-addressed blobs, manifests, hub pull, Modelfiles.

It knows nothing of models in memory: only files, digests and records about them.
"""

from codellm.registry.names import ModelName
from codellm.registry.store import Entry, Registry, default_home

__all__ = ["Entry", "ModelName", "Registry", "default_home"]
