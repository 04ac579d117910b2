"""fedmed's Hydra config tree, installed as the package ``fedmed.conf``.

The tree lives at the top of the repository (``conf/``); the build maps it into the wheel so
an installed fedmed finds it through ``importlib.resources``. Hydra skips this file.
"""
