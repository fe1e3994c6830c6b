"""A small Django project: one app, templates through the (default) cached loader, no database."""

import pathlib

BASE_DIR = pathlib.Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["pages.apps.PagesConfig"]
MIDDLEWARE = ["pages.middleware.tag_worker"]
ROOT_URLCONF = "pages_project.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [BASE_DIR / "templates"]}]
DATABASES = {}
USE_TZ = True
