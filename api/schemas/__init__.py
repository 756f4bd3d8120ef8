"""Marshmallow schemas: they validate requests and generate the OpenAPI document,
so the two can never disagree."""
