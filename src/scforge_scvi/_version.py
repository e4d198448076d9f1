"""The installed version of scforge_scvi, recorded in every pretrained directory."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scforge-scvi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
