"""The package logger (messages such as "Unfreezing backbone at epoch 5")."""

import logging

logger = logging.getLogger("scforge_scvi")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
