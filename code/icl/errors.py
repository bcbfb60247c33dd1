"""Errors that the command line turns into one line of text and exit status 2.

Everything a user can get wrong — an unknown model, experiment or task, a GPU that is not there, a cache
entry that does not verify — raises a subclass of :class:`ICLError`. Library code raises; only
:mod:`icl.cli` prints and exits.
"""


class ICLError(Exception):
    """Base class: a problem with the user's request or the environment, not a bug."""


class UnknownModelError(ICLError):
    pass


class ModelUnavailableError(ICLError):
    pass


class UnknownExperimentError(ICLError):
    pass


class UnknownTaskError(ICLError):
    pass


class DeviceUnavailableError(ICLError):
    pass


class ConfigError(ICLError, ValueError):
    """A value the user chose (a parameter, a setting, a path) that is not allowed."""


class CacheDirError(ConfigError):
    """The cache folder is a file, or cannot be written."""


class CacheMissError(ICLError):
    pass


class CacheCorruptError(ICLError):
    pass
