import os

from django.http import JsonResponse

VERSION = "v1"
VISITS = {"n": 0}  # module state: kept across hot upgrades


def index(request):
    VISITS["n"] += 1
    return JsonResponse({"version": VERSION, "pid": os.getpid(), "visits": VISITS["n"]})
