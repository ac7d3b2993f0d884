"""The one root of every error meant for the user.

Each part of scoreq-live raises its own subclass (a model that does not fit
the contract, an input that cannot be opened, an address that cannot be
served, ...), with a message that says what is wrong and what to do.  The
command line catches :class:`ScoreqLiveError` and prints that message; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ScoreqLiveError(Exception):
    """Something the user can fix: the message says what and how."""


class ConfigError(ScoreqLiveError):
    """The options do not make a working monitor (or scorer, or relay); the message says why."""
