"""A small Flask blog: Jinja2 templates, a static stylesheet, posts from SQLAlchemy models."""

import os

from flask import Flask, jsonify, render_template

import models

VERSION = "v1"

app = Flask(__name__)


@app.after_request
def tag_worker(response):
    response.headers["X-Pid"] = str(os.getpid())
    return response


@app.route("/version")
def version():
    return jsonify(version=VERSION, pid=os.getpid())


@app.route("/")
def index():
    return render_template("index.html", posts=models.titles())


@app.route("/old")
def old():
    return "an old page"
