"""Errors that name what is wrong with the user's input. The CLI prints them without a traceback."""


class JaxgenError(Exception):
  """Base class: a problem with the user's input, data, checkpoint or run, not a bug."""


class ConfigError(JaxgenError, ValueError):
  """Unknown config key, wrong type, or an inconsistent combination of values."""


class DataError(JaxgenError, ValueError):
  """A data set that cannot be read, is not prepared, or does not fit the config."""


class ShapeError(JaxgenError, ValueError):
  """An input whose shape the model was not built for."""


class CheckpointError(JaxgenError):
  """A corrupt checkpoint, or one written by a different model config."""


class NonFiniteLossError(JaxgenError, FloatingPointError):
  """The loss became NaN or Inf; training stopped before saving anything bad."""


class TokenError(JaxgenError, ValueError):
  """A prompt longer than the tokenizer's context, or token ids outside a model's vocabulary."""


class WriteError(JaxgenError, OSError):
  """A file could not be written (full disk, read-only folder, permission); names the path."""


class WorkdirBusyError(JaxgenError):
  """Another process is training in the same workdir."""
