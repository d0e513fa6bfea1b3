"""``cascowfs monitor MNT``: a page a person opens to see and steer a search.

A process of its own (the daemon keeps no network socket) that drives the mount through its
files like any agent (``files.py``), keeps a picture of the search tree, the live branches and
the recent operations (``tracker.py``), and serves it over HTTP (``server.py``): the page in
``static/`` (an installable PWA, plain JavaScript with no build step), a JSON API, an event
stream and ``/metrics`` for Prometheus. docs/monitor.md describes it.
"""
