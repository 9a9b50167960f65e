"""Names shared by the server strategy and the client helpers (the wire protocol).

The strategy adds these entries to every training/evaluation ``ConfigRecord`` so a
ClientApp knows the round's method and schedule without its own configuration:

- ``fedrot-method`` (str), ``fedrot-round`` (int, 0-based: Flower's ``server-round`` − 1),
  ``fedrot-lam`` (float), ``fedrot-schedule`` (str), ``fedrot-initial`` (str, "" for the
  method's default), ``fedrot-allow-reflection`` (bool), ``fedrot-wire-format`` (str: the
  strategy's wire format, which :func:`fedrot_ext.flower.make_train_reply` follows by default).

``fedex`` and ``flora`` move part of the update into the frozen base weights; the
strategy then sends the cumulative base-weight updates in a second ``ArrayRecord``
under :data:`BASE_DELTAS_KEY`.
"""
CONFIG_METHOD = "fedrot-method"
CONFIG_ROUND = "fedrot-round"
CONFIG_LAM = "fedrot-lam"
CONFIG_SCHEDULE = "fedrot-schedule"
CONFIG_INITIAL = "fedrot-initial"
CONFIG_ALLOW_REFLECTION = "fedrot-allow-reflection"
CONFIG_WIRE_FORMAT = "fedrot-wire-format"
FLOWER_SERVER_ROUND = "server-round"  # set by flwr's FedAvg.configure_train, 1-based
BASE_DELTAS_KEY = "fedrot-base-deltas"
# Flower's client-side DP wrappers put the clipping norm here (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM);
# its mods then read both ArrayRecords as NumPy.
FLOWER_CLIPPING_NORM = "clipping_norm"
