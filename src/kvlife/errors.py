"""kvlife's own exception types: errors a user can cause, each with a message that says what to do.

The CLI prints any `KvlifeError` as one line and exits non-zero, without a traceback.
"""


class KvlifeError(Exception):
    """Base class of every error a user can cause."""


class SpecError(KvlifeError):
    """A method spec string (e.g. `snapkv(ratio=0.25)`) does not parse or names unknown things."""


class ModelError(KvlifeError):
    """A model name, directory or file is unknown, not pulled, broken, or fails its checksum."""


class TaskError(KvlifeError):
    """An unknown task or profile, or a task that cannot be generated with the given settings."""


class ResultsError(KvlifeError):
    """A results directory cannot be written or read back."""


class CacheFileError(KvlifeError):
    """A saved KV cache file is missing, truncated or corrupt."""


class BackendError(KvlifeError):
    """A serving backend (an OpenAI-compatible server) is unreachable, refuses a request, or lacks the
    model."""
