"""kvlife: the whole life of a long-context LLM's KV cache.

Layers (imports point downward only): cli -> bench -> session -> methods -> cache/attention -> models.
codec/ and store/ depend on cache.py, never on bench/.
"""

from kvlife.errors import KvlifeError

__version__ = "0.1.0"

__all__ = ["KvlifeError", "__version__"]
