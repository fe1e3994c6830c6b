from django.apps import AppConfig


class HelloConfig(AppConfig):
    name = "hello"

    def ready(self):
        # Once per process, after Django loaded every app and before it serves a request.
        import flydeploy

        flydeploy.startup_reapply_current()
