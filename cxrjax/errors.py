"""The one exception type for problems the user can fix.

Library code raises `UserError` with a one-line message that names the file, key
or value at fault and what was expected; `cxrjax.main` prints it as
`cxrjax: error: <message>` on a line of its own and exits with status 2.
"""


class UserError(Exception):
  """Bad input, config or environment: reported as one line, exit status 2."""

  def __init__(self, message: str):
    # One line, always: a multi-line message would break log parsers and the
    # "clear one-line error" promise.
    super().__init__(' '.join(str(message).split()))
