"""The routes of the Django test project (no trailing slashes: the same paths as the others)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("orders", views.orders),
    path("fail", views.fail),
    path("status/<int:code>", views.status),
    path("big", views.big),
    path("stream", views.stream),
    path("hop", views.hop),
]
