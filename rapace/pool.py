"""PluginPool: the concurrent.futures of plugins (API.md section 2).

Planned: workers started as ``python -m rapace.worker``, calls routed to the worker with the
fewest calls in flight, crashed workers replaced, nothing leaked. The pool sits on top of
:mod:`rapace.session` and the transports; nothing below imports it.
"""

from __future__ import annotations

__all__: tuple[str, ...] = ()
