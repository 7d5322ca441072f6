"""The one place the version is written: pyproject.toml, `costeer --version` and
`costeer.__version__` read it here."""

__version__ = "0.1.0"
