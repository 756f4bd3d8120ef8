"""Message templates: checked when written, sandboxed, lenient about missing data."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from engine.campaigns.rendering import CompiledChannel
from engine.campaigns.templates import (
    CONTACT_FIELDS,
    TemplateRenderError,
    compile_template,
    contact_context,
    plain_template,
    render_template,
    template_problems,
)
from engine.models import Contact
from tests.campaigns_fixtures import API, EMAIL_CONFIG, add_channel, create_campaign
from tests.helpers import assert_error


def a_contact(**fields) -> SimpleNamespace:
    """A contact-shaped row: rendering takes any object with the Contact columns."""
    base = {column.key: None for column in Contact.__table__.columns}
    base.update(
        id=uuid.UUID(int=7),
        push_tokens=[],
        attributes={},
        consent_email=True,
        consent_sms=False,
        consent_push=False,
        consent_whatsapp=False,
    )
    base.update(fields)
    return SimpleNamespace(**base)


CAMPAIGN = SimpleNamespace(id=uuid.UUID(int=1), name="Spring <sale>", description=None)


def render(source: str, contact=None, *, html: bool = False) -> str:
    context = {
        "contact": contact_context(contact or a_contact()),
        "campaign": {"id": "1", "name": "Spring", "description": None},
        "unsubscribe_url": "https://herald.test/u/abc",
    }
    return render_template(compile_template(source, html=html), context, "body")


# -- checks when written ------------------------------------------------------------


def test_a_syntax_error_names_its_line():
    [problem] = template_problems("Hello\n\n{% if contact.first_name %}no end")
    assert problem.startswith("syntax error at line 3: Unexpected end of template.")
    assert "'endif'" in problem
    assert template_problems("{{ contact.first_name ")[0].startswith("syntax error at line 1")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("Hi {{ contakt.first_name }}", "unknown variable 'contakt'"),
        ("{{ first_name }}", "unknown variable 'first_name'"),
        ("{{ contact.emial }}", "unknown variable 'contact.emial'"),
        ("{{ contact['user_id'] }}", "unknown variable 'contact.user_id'"),
        ("{{ contact.consent_email }}", "unknown variable 'contact.consent_email'"),
        ("{{ contact.consent.fax }}", "unknown variable 'contact.consent.fax'"),
        ("{{ campaign.status }}", "unknown variable 'campaign.status'"),
        ("{{ campaign.config }}", "unknown variable 'campaign.config'"),
        ("{% if contact.vip %}x{% endif %}", "unknown variable 'contact.vip'"),
    ],
)
def test_unknown_variables_and_fields_are_refused(source, problem):
    assert template_problems(source) == [problem]


def test_every_documented_field_and_any_attribute_is_accepted():
    for field in CONTACT_FIELDS:
        assert template_problems(f"{{{{ contact.{field} }}}}") == [], field
    for channel in ("email", "sms", "push", "whatsapp"):
        assert template_problems(f"{{{{ contact.consent.{channel} }}}}") == []
    accepted = [
        "{{ campaign.id }} {{ campaign.name }} {{ campaign.description }} {{ unsubscribe_url }}",
        "{{ contact.attributes.tier }} {{ contact.attributes['loyalty-points'] }}",
        "{{ contact.attributes.address.city }} {{ contact.attributes.anything_at_all }}",
        "{% for token in contact.push_tokens %}{{ loop.index }}{{ token }}{% endfor %}",
        "{% set greeting = 'Hi' %}{{ greeting }} {{ contact.first_name|default('there') }}",
        "{{ contact.first_name|upper }} {{ range(3)|join(',') }}",
    ]
    for source in accepted:
        assert template_problems(source) == [], source


def test_every_contact_column_is_either_exposed_or_deliberately_hidden():
    hidden = {"user_id", "consent_email", "consent_sms", "consent_push", "consent_whatsapp"}
    columns = {column.key for column in Contact.__table__.columns}
    assert columns - hidden == CONTACT_FIELDS - {"consent"}


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''['__class__'] }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ contact.attributes._private }}",
        "{{ contact|attr('__class__') }}",
        "{{ [contact]|map(attribute='__class__')|list }}",
    ],
)
def test_private_attribute_access_is_refused_when_written(source):
    problems = template_problems(source)
    assert problems and all("is not allowed" in p for p in problems), problems


def test_computed_names_on_checked_records_are_refused():
    assert template_problems("{{ contact[campaign.name] }}") == [
        "line 1: 'contact' fields must be named, not computed"
    ]
    assert template_problems("{{ contact|attr(campaign.name) }}") == [
        "line 1: the attr filter needs a literal name"
    ]
    # Attributes are free-form, so a computed key there is fine.
    assert template_problems("{{ contact.attributes[campaign.name] }}") == []


def test_unknown_filters_tests_and_includes_are_refused_when_written():
    assert template_problems("{{ contact.first_name|shout }}") == [
        "syntax error at line 1: No filter named 'shout'."
    ]
    # Jinja itself would only notice these when rendering.
    assert template_problems("{% if contact.first_name|shout %}x{% endif %}") == [
        "line 1: no filter named 'shout'"
    ]
    assert template_problems("{% if contact is shouting %}x{% endif %}") == [
        "line 1: no test named 'shouting'"
    ]
    assert template_problems('{% include "other.html" %}') == [
        "line 1: a template cannot extend, include or import another"
    ]


# -- rendering ----------------------------------------------------------------------


def test_the_sandbox_still_stops_what_a_static_check_cannot_see():
    # Built at render time, so no check can read it; the sandbox refuses it anyway.
    template = compile_template("{{ ''|attr('__cla' ~ 'ss__') }}")
    with pytest.raises(TemplateRenderError) as caught:
        render_template(template, {}, "subject")
    assert caught.value.fields == {
        "config.subject": [
            "SecurityError: access to attribute '__class__' of 'str' object is unsafe."
        ]
    }
    with pytest.raises(TemplateRenderError):
        render("{% set x = contact.push_tokens.append('x') %}")


def test_missing_data_renders_empty_and_falsy():
    contact = a_contact(first_name=None, attributes={"tier": "gold", "address": {"city": "Oslo"}})
    assert render("[{{ contact.first_name }}]", contact) == "[]"
    assert render("[{{ contact.attributes.missing }}]", contact) == "[]"
    assert render("[{{ contact.attributes.address.zip }}]", contact) == "[]"
    assert render("[{{ contact.attributes.nothing.deeper.still }}]", contact) == "[]"
    assert render("{{ contact.attributes.address.city }}", contact) == "Oslo"
    assert render("{% if contact.attributes.vip %}VIP{% else %}-{% endif %}", contact) == "-"
    assert render("{{ contact.attributes.vip is defined }}", contact) == "False"
    assert render("{{ contact.attributes.tier is defined }}", contact) == "True"
    assert render("{{ contact.first_name or 'there' }}", contact) == "there"
    assert render("{{ contact.attributes.nick|default('pal') }}", contact) == "pal"


def test_attributes_are_read_by_key_even_when_named_like_dict_methods():
    contact = a_contact(attributes={"items": 3, "keys": "k", "get": "g"})
    assert render("{{ contact.attributes.items }}-{{ contact.attributes.keys }}", contact) == "3-k"
    assert render("{{ contact.attributes['get'] }}", contact) == "g"


def test_every_context_field_renders():
    contact = a_contact(
        external_id="ext-1",
        email="ada@example.com",
        phone="+4712345678",
        first_name="Ada",
        last_name="Lovelace",
        locale="en",
        push_tokens=["t1"],
        created_at=datetime(2030, 1, 2, tzinfo=UTC),
    )
    assert (
        render(
            "{{ contact.id }}|{{ contact.external_id }}|{{ contact.email }}|{{ contact.phone }}|"
            "{{ contact.first_name }} {{ contact.last_name }}|{{ contact.locale }}|"
            "{{ contact.push_tokens[0] }}|{{ contact.consent.email }}/{{ contact.consent.sms }}|"
            "{{ contact.created_at.year }}|{{ campaign.name }}|{{ unsubscribe_url }}",
            contact,
        )
        == f"{uuid.UUID(int=7)}|ext-1|ada@example.com|+4712345678|Ada Lovelace|en|t1|True/False|"
        "2030|Spring|https://herald.test/u/abc"
    )


def test_autoescape_applies_to_email_html_only():
    compiled = CompiledChannel.compile(
        "email",
        {
            "subject": "{{ campaign.name }}",
            "html": "<b>{{ campaign.name }}</b>",
            "text": "{{ campaign.name }}",
        },
        CAMPAIGN,
    )
    rendered = compiled.render(a_contact())
    assert rendered == {
        "subject": "Spring <sale>",
        "html": "<b>Spring &lt;sale&gt;</b>",
        "text": "Spring <sale>",
    }


def test_a_compiled_channel_renders_many_contacts_without_recompiling():
    compiled = CompiledChannel.compile(
        "whatsapp",
        {"template": {"name": "t", "language": "en", "parameters": ["{{ contact.first_name }}"]}},
        CAMPAIGN,
    )
    templates_before = [template for _field, template in compiled.templates]
    outputs = [
        compiled.render(a_contact(first_name=f"n{i}"))["template"]["parameters"][0]
        for i in range(500)
    ]
    assert outputs == [f"n{i}" for i in range(500)]
    assert [template for _field, template in compiled.templates] == templates_before
    # Rendering never writes into the stored config.
    assert compiled.config["template"]["parameters"] == ["{{ contact.first_name }}"]


# -- through the API ----------------------------------------------------------------


def test_template_errors_answer_422_naming_the_field_when_written(client, alice, db_session):
    campaign = create_campaign(client, alice)
    url = f"{API}/{campaign['id']}/channels"
    config = {
        **EMAIL_CONFIG,
        "subject": "Hi {{ contakt.first_name }}",
        "html": "<p>\n{{ contact.first_name }}\n{% if %}</p>",
        "text": "{{ contact.attributes.tier }} {{ contact.favourite_colour }}",
    }
    error = assert_error(
        client.post(
            url, json={"channel_type": "email", "config": config}, headers=alice["headers"]
        ),
        422,
        "validation_error",
    )
    assert error["fields"] == {
        "config.subject": ["unknown variable 'contakt'"],
        "config.html": [
            "syntax error at line 3: Expected an expression, got 'end of statement block'"
        ],
        "config.text": ["unknown variable 'contact.favourite_colour'"],
    }
    sandboxed = {"body": "{{ ''.__class__ }}"}
    error = assert_error(
        client.post(
            url, json={"channel_type": "sms", "config": sandboxed}, headers=alice["headers"]
        ),
        422,
        "validation_error",
    )
    assert error["fields"] == {"config.body": ["line 1: access to '__class__' is not allowed"]}
    whatsapp = {"template": {"name": "t", "language": "en", "parameters": ["ok", "{{ nope }}"]}}
    error = assert_error(
        client.post(
            url, json={"channel_type": "whatsapp", "config": whatsapp}, headers=alice["headers"]
        ),
        422,
        "validation_error",
    )
    assert error["fields"] == {"config.template.parameters[1]": ["unknown variable 'nope'"]}
    push = {"title": "{{ campaign.nam }}", "body": "{{ contact.consent.fax }}"}
    error = assert_error(
        client.post(url, json={"channel_type": "push", "config": push}, headers=alice["headers"]),
        422,
        "validation_error",
    )
    assert error["fields"] == {
        "config.title": ["unknown variable 'campaign.nam'"],
        "config.body": ["unknown variable 'contact.consent.fax'"],
    }
    listed = client.get(url, headers=alice["headers"]).get_json()
    assert listed["items"] == []


def test_template_errors_are_checked_on_update_too(client, alice, db_session):
    campaign = create_campaign(client, alice)
    channel = add_channel(client, alice, campaign["id"], "sms")
    url = f"{API}/{campaign['id']}/channels/{channel['id']}"
    error = assert_error(
        client.patch(
            url, json={"config": {"body": "{{ contact.nickname }}"}}, headers=alice["headers"]
        ),
        422,
        "validation_error",
    )
    assert error["fields"] == {"config.body": ["unknown variable 'contact.nickname'"]}
    unchanged = client.get(url, headers=alice["headers"]).get_json()
    assert unchanged["config"] == channel["config"]


# -- the fast path ------------------------------------------------------------------


PLAIN_SOURCES = [
    "",
    "Spring is here.",
    "Hi {{ contact.first_name }}, {{ campaign.name }}",
    "Hi {{contact['first_name']}}!\r\nBye {{- contact.last_name -}} .\n",
    "<p>{{ contact.first_name }} &amp; {{ campaign.name }} {{ unsubscribe_url }}</p>",
    "{{ contact.id }}|{{ contact.email }}|{{ contact.push_tokens }}|{{ contact.created_at }}",
    "{{ contact.consent.email }}/{{ contact.consent['sms'] }}|{{ campaign.description }}",
    "{{ contact.attributes.tier }}|{{ contact.attributes['loyalty-points'] }}|"
    "{{ contact.attributes.missing }}|{{ contact.attributes.address }}|{{ contact.attributes.n }}",
    "{% raw %}{{ not a lookup }}{% endraw %} {# a comment #}{{ contact.locale }}",
]
JINJA_SOURCES = [
    "{{ contact.first_name|upper }}",
    "{% if contact.attributes.vip %}VIP{% endif %}",
    "{{ contact.attributes.address.city }}",
    "{{ contact.first_name or 'there' }}",
    "{{ 'literal' }}",
    "{{ contact }}",
    "{{ contact.attributes }}",
    "{{ contact.consent }}",
    "{% for t in contact.push_tokens %}{{ t }}{% endfor %}",
    "{{ contact.created_at.year }}",
]
CONTACTS = [
    a_contact(),
    a_contact(
        first_name="Ada <b>",
        last_name="O'Neil & co",
        email="ada@example.com",
        locale="nb",
        push_tokens=["t1", "<t2>"],
        created_at=datetime(2030, 1, 2, tzinfo=UTC),
        consent_sms=True,
        attributes={
            "tier": "<gold>",
            "loyalty-points": 12,
            "address": {"city": "Oslo", "zip": None},
            "n": None,
        },
    ),
]


@pytest.mark.parametrize("source", PLAIN_SOURCES)
@pytest.mark.parametrize("html", [False, True])
def test_plain_templates_render_exactly_as_jinja(source, html):
    plain = plain_template(source, html=html)
    assert plain is not None
    campaign = {"id": "1", "name": "Spring <sale>", "description": None}
    for contact in CONTACTS:
        context = {
            "contact": contact_context(contact),
            "campaign": campaign,
            "unsubscribe_url": "https://herald.test/u/a&b",
        }
        expected = render_template(compile_template(source, html=html), context, "body")
        assert plain.render(contact, campaign, "https://herald.test/u/a&b") == expected


@pytest.mark.parametrize("source", JINJA_SOURCES)
def test_anything_but_plain_lookups_keeps_jinja(source):
    assert template_problems(source) == []
    assert plain_template(source) is None


def test_a_compiled_channel_reads_only_the_columns_its_templates_name():
    compiled = CompiledChannel.compile(
        "email",
        {"subject": "Hi {{ contact.first_name }}", "html": "{{ contact.consent.sms }}"},
        CAMPAIGN,
    )
    assert compiled.contact_columns == {"first_name", "consent_sms"}
    assert not compiled.shows_unsubscribe_url
    row = SimpleNamespace(first_name="Ada", consent_sms=True)  # nothing else fetched
    assert compiled.render(row) == {"subject": "Hi Ada", "html": "True"}

    mixed = CompiledChannel.compile(
        "sms", {"body": "{{ contact.first_name|upper }} {{ unsubscribe_url }}"}, CAMPAIGN
    )
    assert mixed.contact_columns >= {"id", "attributes", "consent_email", "first_name"}
    assert mixed.shows_unsubscribe_url
    assert mixed.render(a_contact(first_name="ada"), unsubscribe_url="u") == {"body": "ADA u"}


def test_a_plain_template_failing_on_odd_data_names_its_field():
    compiled = CompiledChannel.compile("sms", {"body": "{{ contact.attributes.x }}"}, CAMPAIGN)
    with pytest.raises(TemplateRenderError) as caught:
        compiled.render(a_contact(attributes=["not", "an", "object"]))
    assert caught.value.field == "body"
