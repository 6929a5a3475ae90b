"""The tracking layer: every MLflow query and write of the platform (``store``), the tag names
(``tags``), and ``lab server``."""
