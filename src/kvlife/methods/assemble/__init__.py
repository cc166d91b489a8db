"""Context assembly from per-document caches (stage "assemble"): concat, cacheblend, epic."""
