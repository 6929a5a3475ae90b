"""The Hydra config tree (a package so Hydra can find it in an installed copy)."""
