"""The one error type a user can cause. The CLI turns it into a short message and exit code 2.

This module is a leaf: every layer may import it, it imports nothing of loraforge.
"""
from __future__ import annotations


class LoraforgeError(Exception):
    """A problem with the user's input (a file, a flag, a config value) that they can fix.

    The message must say what is wrong, where (file, line, field) and what to do about it.
    """

    exit_code = 2
