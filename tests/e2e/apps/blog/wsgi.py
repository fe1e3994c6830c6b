"""The WSGI entry point (``gunicorn wsgi:app``): flydeploy catches up before the app is imported."""

import flydeploy

flydeploy.startup_reapply_current()

from blog import app  # noqa: E402,F401  (imported after the catch-up: it loads the code this machine runs)
