"""Built-in corpora, synthesized offline: `demo` and `english` (see builtin.py)."""
