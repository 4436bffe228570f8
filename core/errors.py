"""The one base class of errors a user can cause and fix (bad input, a missing file or extra)."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error the user caused and can fix; its message names the input and what to do.

    The CLI prints it as one line (no traceback) and exits with status 2. Subclass it for each kind
    of user error (``StoreError``, ``BackendSpecError`` ...) so the CLI needs one handler only.
    """
