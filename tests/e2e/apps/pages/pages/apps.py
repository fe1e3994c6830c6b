from django.apps import AppConfig


class PagesConfig(AppConfig):
    name = "pages"

    def ready(self):
        import flydeploy

        flydeploy.startup_reapply_current()
