"""The HTTP layer: sites that own the listening sockets and the policy their routes share.

:class:`~scoreq_live.http.site.HttpSite` is one listen address (``--http``,
``--whip``) with its aiohttp application; parts add their routes to it
(:class:`~scoreq_live.http.site.Routes`): the feed's ``/ws``, the panel's
files, ``/metrics``, WHIP and ``/media``.  :mod:`scoreq_live.http.policy`
decides every answer without I/O.  A new route is a new part: a class with
``add_routes(site)`` and ``listening(site)``, added to the site where the
monitor and the relay assemble theirs (:func:`scoreq_live.monitor.serve_parts`).
"""
