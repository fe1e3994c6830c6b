import os

from django.http import HttpResponse, JsonResponse
from django.shortcuts import render

VERSION = "v1"
PAGES = ["About", "Contact"]


def version(request):
    return JsonResponse({"version": VERSION, "pid": os.getpid()})


def index(request):
    return render(request, "index.html", {"pages": PAGES})


def old(request):
    return HttpResponse("an old page")
