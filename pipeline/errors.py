"""The base of every error that means bad input or set-up rather than a bug.

The CLI prints these as one message with no traceback. This module imports nothing
heavy, so the CLI can catch them without loading TensorFlow.
"""


class PipelineError(Exception):
    """Bad input or set-up; the message names the file or parameter and the fix."""


class StageInputError(PipelineError, ValueError):
    """A stage's input tables are valid but leave it nothing to work on."""
