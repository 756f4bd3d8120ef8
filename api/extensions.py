"""Every Flask extension object, created unbound here and bound in create_app."""

from __future__ import annotations

from flask_jwt_extended import JWTManager

from api.db import Database
from api.openapi import HeraldApi

db = Database()
jwt = JWTManager()
openapi = HeraldApi()
