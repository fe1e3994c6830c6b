from django.conf import settings
from django.urls import path, re_path
from django.views.static import serve

from pages import views

urlpatterns = [
    path("version", views.version),
    path("", views.index),
    path("old", views.old),
    re_path(r"^static/(?P<path>.*)$", serve, {"document_root": settings.BASE_DIR / "static"}),
]
