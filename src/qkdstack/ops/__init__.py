"""Operations: Prometheus metrics, the admin listener with its live dashboard, and structured logs.

* :mod:`qkdstack.ops.metrics`: a Prometheus registry per node whose collector reads the node's status
  document (the dict ``Node.write_status`` writes to ``status.json``) and its round history
  (``rounds.jsonl``), plus ETSI GS QKD 014 request metrics from an ASGI middleware.
* :mod:`qkdstack.ops.admin`: the HTTP admin listener (``[admin] listen``): ``/metrics``, ``/`` (the
  dashboard), ``/status.json`` and ``/rounds.json``; loopback only unless ``[admin] token`` is set.
* :mod:`qkdstack.ops.dashboard`: the dashboard page (offline, inline SVG drawn by a little vanilla
  JavaScript) and ``qkdstack dashboard --deployment DIR`` over every site of a deployment.
* :mod:`qkdstack.ops.logs`: ``--log-format json``, one JSON object per log line.

Nothing here ever reads, labels or serves key bytes: the status document and the round history
carry none (see docs/node.md), and the ETSI 014 middleware counts keys without decoding them.
See docs/operations.md.
"""
