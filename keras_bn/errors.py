"""The one exception type of keras_bn, and the helpers that format its messages."""

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class KerasBNError(ValueError):
    """Raised for bad input to keras_bn and its export tooling.

    A subclass of `ValueError`, so callers that already catch `ValueError` for bad arguments keep
    working. Messages follow the Keras form: what is wrong, then "Expected: ... Received: ...",
    then what to do about it when that is not obvious.
    """


def expected(what, expected_value, received, fix=None):
    """Builds the message "<what>. Expected: <expected>. Received: <received>.[ <fix>]"."""
    message = f"{what}. Expected: {expected_value}. Received: {received}."
    if fix:
        message += f" {fix}"
    return message


class SkippedUpdateWarning(RuntimeWarning):
    """A `keras_bn.BatchNorm` training batch left the moving statistics unchanged: its statistics
    held NaN or Inf, or it had one value per channel under XLA. A `RuntimeWarning`, so filters on
    that category keep working."""


class MissingExtraError(KerasBNError, ImportError):
    """A feature needs packages of a keras-bn extra that are not installed. The message names the
    `pip install "keras-bn[...]"` command. Also an `ImportError`, so code that guards an optional
    import with `except ImportError` keeps working; the command line exits with 2."""


class VerificationError(KerasBNError):
    """A folded model or an exported graph does not reproduce the original within tolerance.

    The one kind of KerasBNError that is not about bad input; the command line exits with 1.
    """


def plain_text(text) -> str:
    """`text` without terminal escape codes (Keras colours some of its messages)."""
    return _ANSI.sub("", str(text))


def one_line(text, limit=300) -> str:
    """An exception's (or any) text on one line, without escape codes, cut at a word boundary
    after `limit` characters (None: whole, for a message whose cause comes last, as Keras's
    load errors)."""
    text = " ".join(plain_text(text).split())
    if limit is None or len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
