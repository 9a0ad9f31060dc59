"""One file per replaced kind. Each replacement module adopts the original's parameters (see base.py)."""
