"""Data layer: loading, validating and cleaning inputs; id maps, matrices, features and splits.

Data enters through :mod:`features.readers` (files with a column mapping) or an adapter in
:mod:`features.adapters`, is checked by :mod:`features.schema`, cleaned by
:mod:`features.cleaning` (every step counted in a :class:`~features.cleaning.CleaningReport`),
turned into id maps and matrices by :mod:`features.dataset` and cut by :mod:`features.splits`.
"""

from features.errors import ConfigError, DataValidationError, InputError

__all__ = ["ConfigError", "DataValidationError", "InputError"]
