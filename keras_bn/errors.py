"""The one exception type of keras_bn, and the helper that formats its messages."""


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


class VerificationError(KerasBNError):
    """A folded model or an exported graph does not reproduce the original within tolerance.

    The one kind of KerasBNError that is not about bad input; the command line exits with 1.
    """
