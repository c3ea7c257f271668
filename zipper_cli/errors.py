"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class ZipperError(Exception):
    """A user-facing error: the message names the file or flag and the problem, on one line."""


class Interrupted(Exception):
    """A stage stopped by SIGTERM or Ctrl-C after saving its state; rerunning the command resumes."""
