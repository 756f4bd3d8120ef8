"""Audiences: the JSON rule language (definition), its SQL compiler, the Python reference
evaluator that states its semantics, and the campaign recipients built on them."""

from engine.audiences.compiler import AudienceCompiler
from engine.audiences.definition import Node, parse_definition
from engine.audiences.recipients import recipient_counts, recipients_query, recipients_select

__all__ = [
    "AudienceCompiler",
    "Node",
    "parse_definition",
    "recipient_counts",
    "recipients_query",
    "recipients_select",
]
