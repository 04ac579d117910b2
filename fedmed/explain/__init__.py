"""Explanations computed where the patients are (``fedmed explain``, ``fedmed site explain``).

Nothing here sends anything: a site's explanations are written into its own folder, and the
coordinator's view is built from the global model alone.
"""

# The option both ``fedmed explain`` and ``fedmed site explain`` take (kept here, import-light).
RECORDS_HELP = "these test records (0-based) instead of one chosen per outcome"
