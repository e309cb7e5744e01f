"""The Django project's routes."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [path("orders", views.orders), path("slow", views.slow)]
