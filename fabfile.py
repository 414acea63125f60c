"""`fab --list` from the repository root: the kit's playbooks (playbooks/__init__.py)."""

from playbooks import namespace as ns  # noqa: F401 - Fabric looks for `ns`
