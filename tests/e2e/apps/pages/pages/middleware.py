import os


def tag_worker(get_response):
    """Name the worker that answered (``X-Pid``)."""
    def middleware(request):
        response = get_response(request)
        response["X-Pid"] = str(os.getpid())
        return response
    return middleware
