"""qkdstack: a quantum key distribution stack.

Layers (see docs/architecture.md): ``physics`` (simulated decoy-state BB84 device),
``theory`` (key-rate formulas and finite-key bounds), ``protocol`` (post-processing
stages over a :class:`~qkdstack.transport.channel.Channel`), ``auth`` (Wegman–Carter
authentication and bootstrap), ``transport`` (codec and TCP link), ``kms`` (key store
and delivery), ``node`` (the site service) and ``apps`` (key consumers).
"""

__version__ = "0.1.0"
