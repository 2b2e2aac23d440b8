"""modelconsole on a Ray cluster (``--cluster ray[://ADDRESS]``): docs/cluster.md.

``controller.py`` (the one control plane), ``core.py`` (an engine core per
node), ``frontend.py`` and ``link.py`` (front ends on every node and how they
route), ``fleet.py`` (the fleet with one engine's face), ``placement.py``
(where versions go: pure), ``rayenv.py`` (names, connection, loopback),
``launch.py`` (what ``--serve --cluster`` runs).
"""
