"""vimexp: Vision Mamba experiments."""


class VimexpError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (printed as one line)."""
