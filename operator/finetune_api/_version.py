"""The project's version: the one place it is written.

pyproject.toml reads it (setuptools dynamic version), the chart's version and appVersion are generated from it
(`python helm/chartgen.py`), the operator's default trainer image tag and every `--version` print it.
"""

__version__ = "0.1.0"
