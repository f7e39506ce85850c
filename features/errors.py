"""Errors for bad input. Each names where the problem is and what was expected.

Anything derived from :class:`InputError` is the user's input being wrong (a file, a column, a
config key); the command line turns it into a message on stderr and exit code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input supplied by the user (exit code 2 on the command line)."""


class DataValidationError(InputError):
    """A data file or table does not match the documented input schema.

    Parameters
    ----------
    source : str
        What was being read: a file path, or a description such as ``"interactions table"``.
    problem : str
        What is wrong and what was expected.
    column : str, optional
        The column concerned (its name in the file, not the canonical one, where they differ).
    """

    def __init__(self, source: str, problem: str, column: str | None = None) -> None:
        self.source = source
        self.column = column
        self.problem = problem
        where = f"{source}: column '{column}'" if column else source
        super().__init__(f"{where}: {problem}")


class ConfigError(InputError):
    """A configuration value is missing, unknown or of the wrong type.

    Parameters
    ----------
    key : str
        Dotted path of the key, e.g. ``"data.cleaning.returns"``.
    problem : str
        What is wrong and what was expected.
    source : str, optional
        The config file.
    """

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        prefix = f"{source}: " if source else ""
        where = "" if key.startswith("<") else f"config key '{key}': "  # <file>, <root>
        super().__init__(f"{prefix}{where}{problem}")
