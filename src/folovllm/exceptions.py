"""The one rule for bad input: ``ValueError`` naming the field, raised before any compute.

A problem with the *type* of a value (a ``bool`` or a ``float`` where an integer
goes, a dict where a list goes) raises ``InvalidTypeError``, which is a
``TypeError`` as Python users expect and a ``ValueError`` like every other bad
input (numpy's ``AxisError`` is a ``ValueError`` and an ``IndexError`` for the
same reason): ``except ValueError`` catches every bad input, which is what the
CLI and a server map to "bad request". Misuse of engine *state* (a scheduler
that cannot progress, ``LLM.generate`` on an engine holding someone else's
requests) is a ``RuntimeError``.
"""

from __future__ import annotations


class InvalidTypeError(TypeError, ValueError):
    """Bad input whose problem is its type; the message names the field and the accepted types."""
