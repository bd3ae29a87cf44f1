"""The benchmarks' own tests: the shared fixtures, from ``testkit``."""

from testkit.pytest_plugin import no_env_leaks, source_base_dir

__all__ = ["no_env_leaks", "source_base_dir"]  # fixtures: pytest finds them here
