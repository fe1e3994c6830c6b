"""The WSGI entry point (``gunicorn pages_project.wsgi``); flydeploy starts in ``PagesConfig.ready``."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pages_project.settings")
application = get_wsgi_application()
