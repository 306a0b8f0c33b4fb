"""Error families. Each message names what is wrong, where (key or file:line), and the fix.

The CLI prints a TunelabError without a traceback and exits non-zero (``--debug`` shows it).
"""


class TunelabError(Exception):
    """Base of every error tunelab raises on purpose."""


class ConfigError(TunelabError):
    """A config is invalid. ``problems`` lists every problem found, each with its fix."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n > 1 else ''} in the config:\n{lines}")


class DataError(TunelabError):
    """A data file or row is invalid. The message starts with file:line."""


class ModelError(TunelabError):
    """A model reference cannot be resolved or loaded."""


class RunError(TunelabError):
    """A run directory is missing, incomplete, or cannot be resumed."""
