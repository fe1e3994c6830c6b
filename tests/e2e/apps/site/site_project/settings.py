"""A minimal Django project: one app, no database."""

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["hello.apps.HelloConfig"]
ROOT_URLCONF = "site_project.urls"
DATABASES = {}
USE_TZ = True
