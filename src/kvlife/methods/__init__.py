"""Methods for every stage of the KV cache's life; `registry.py` lists them all."""
