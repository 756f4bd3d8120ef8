"""/api/v1/conversations through the real app and PostgreSQL: storage of conversations
and user messages, archiving, deletion that unlinks campaigns, tenant isolation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, select

from engine.models import Campaign, Conversation, Message
from engine.services.conversations import MAX_CONTENT_BYTES, MESSAGES_IN_DETAIL
from tests.helpers import assert_error

URL = "/api/v1/conversations"


def create(client, account, **body) -> dict:
    response = client.post(URL, json=body, headers=account["headers"])
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def say(client, account, conversation_id, content, **extra):
    return client.post(
        f"{URL}/{conversation_id}/messages",
        json={"content": content, **extra},
        headers=account["headers"],
    )


def test_create_with_and_without_title(client, alice, db_session):
    titled = create(client, alice, title="Black Friday ideas")
    assert titled["title"] == "Black Friday ideas" and titled["status"] == "active"
    assert datetime.fromisoformat(titled["created_at"]).utcoffset() == timedelta(0)
    untitled = create(client, alice)
    assert untitled["title"] is None
    rows = dict(db_session.execute(select(Conversation.id, Conversation.user_id)).all())
    assert rows == {uuid.UUID(titled["id"]): alice["id"], uuid.UUID(untitled["id"]): alice["id"]}

    for body, field in (
        ({"title": ""}, "title"),
        ({"title": "x" * 256}, "title"),
        ({"title": 5}, "title"),
        ({"status": "archived"}, "status"),
        ({"user_id": str(uuid.uuid4())}, "user_id"),
    ):
        assert_error(
            client.post(URL, json=body, headers=alice["headers"]), 422, "validation_error", field
        )
    assert db_session.scalar(select(func.count()).select_from(Conversation)) == 2


def test_messages_are_stored_as_user_messages_and_read_oldest_first(client, alice, db_session):
    conversation = create(client, alice, title="Plan")
    first = say(client, alice, conversation["id"], "Hello", metadata={"client": "web", "n": 1})
    assert first.status_code == 201
    message = first.get_json()
    assert message["role"] == "user" and message["content"] == "Hello"
    assert message["metadata"] == {"client": "web", "n": 1}
    assert message["conversation_id"] == conversation["id"]
    second = say(client, alice, conversation["id"], "Next: a winter sale").get_json()
    assert second["metadata"] == {}

    detail = client.get(f"{URL}/{conversation['id']}", headers=alice["headers"]).get_json()
    assert [m["content"] for m in detail["messages"]] == ["Hello", "Next: a winter sale"]
    assert detail["message_count"] == 2 and detail["messages_truncated"] is False
    assert detail["title"] == "Plan"
    stored = db_session.execute(
        select(Message.role, Message.content, Message.message_metadata).order_by(Message.created_at)
    ).all()
    assert stored == [
        ("user", "Hello", {"client": "web", "n": 1}),
        ("user", "Next: a winter sale", {}),
    ]


def test_message_validation_names_the_field(client, alice, db_session):
    conversation_id = create(client, alice)["id"]
    cases = [
        ({}, "content"),
        ({"content": ""}, "content"),
        ({"content": "   \n"}, "content"),
        ({"content": None}, "content"),
        ({"content": 42}, "content"),
        ({"content": "hi", "role": "assistant"}, "role"),
        ({"content": "hi", "metadata": ["not", "an", "object"]}, "metadata"),
        ({"content": "hi", "metadata": {"blob": "x" * 17000}}, "metadata"),
        # 16,385 characters but 32,770 bytes: the limit counts UTF-8 bytes.
        ({"content": "é" * (MAX_CONTENT_BYTES // 2 + 1)}, "content"),
        ({"content": "a" * (MAX_CONTENT_BYTES + 1)}, "content"),
    ]
    url = f"{URL}/{conversation_id}/messages"
    for body, field in cases:
        response = client.post(url, json=body, headers=alice["headers"])
        assert_error(response, 422, "validation_error", field)
    assert db_session.scalar(select(func.count()).select_from(Message)) == 0

    at_limit = say(client, alice, conversation_id, "a" * MAX_CONTENT_BYTES)
    assert at_limit.status_code == 201
    assert len(at_limit.get_json()["content"]) == MAX_CONTENT_BYTES


def test_archived_conversations_take_no_messages_until_unarchived(client, alice, db_session):
    conversation = create(client, alice, title="Old")
    url = f"{URL}/{conversation['id']}"
    assert say(client, alice, conversation["id"], "before").status_code == 201
    archived = client.patch(url, json={"status": "archived"}, headers=alice["headers"])
    assert archived.status_code == 200 and archived.get_json()["status"] == "archived"

    error = assert_error(
        say(client, alice, conversation["id"], "after"), 409, "conversation_archived"
    )
    assert error["current_status"] == "archived"
    assert db_session.scalar(select(func.count()).select_from(Message)) == 1

    client.patch(url, json={"status": "active"}, headers=alice["headers"])
    assert say(client, alice, conversation["id"], "again").status_code == 201


def test_patch_title_and_status(client, alice):
    conversation = create(client, alice, title="Draft")
    url = f"{URL}/{conversation['id']}"
    renamed = client.patch(url, json={"title": "Spring launch"}, headers=alice["headers"])
    assert renamed.get_json()["title"] == "Spring launch"
    assert renamed.get_json()["status"] == "active"
    cleared = client.patch(url, json={"title": None}, headers=alice["headers"])
    assert cleared.get_json()["title"] is None
    for body, field in (
        ({"status": "deleted"}, "status"),
        ({"title": ""}, "title"),
        ({"role": "x"}, "role"),
    ):
        assert_error(
            client.patch(url, json=body, headers=alice["headers"]), 422, "validation_error", field
        )
    detail = client.get(url, headers=alice["headers"]).get_json()
    assert detail["title"] is None and detail["status"] == "active"


def test_list_pages_newest_first_and_filters_by_status(client, alice):
    made = [create(client, alice, title=f"c{i}") for i in range(3)]
    client.patch(f"{URL}/{made[0]['id']}", json={"status": "archived"}, headers=alice["headers"])

    page = client.get(f"{URL}?limit=2", headers=alice["headers"]).get_json()
    assert [c["title"] for c in page["items"]] == ["c2", "c1"]
    rest = client.get(
        f"{URL}?limit=2&cursor={page['next_cursor']}", headers=alice["headers"]
    ).get_json()
    assert [c["title"] for c in rest["items"]] == ["c0"] and rest["next_cursor"] is None
    archived = client.get(f"{URL}?status=archived", headers=alice["headers"]).get_json()
    assert [c["title"] for c in archived["items"]] == ["c0"]
    active = client.get(f"{URL}?status=active", headers=alice["headers"]).get_json()
    assert [c["title"] for c in active["items"]] == ["c2", "c1"]
    assert "messages" not in page["items"][0]
    assert_error(
        client.get(f"{URL}?status=open", headers=alice["headers"]),
        422,
        "validation_error",
        "status",
    )


def test_detail_caps_messages_and_the_message_list_pages_through_all(client, alice, db_session):
    conversation_id = uuid.UUID(create(client, alice)["id"])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    total = MESSAGES_IN_DETAIL + 2
    db_session.execute(
        insert(Message),
        [
            {
                "id": uuid.uuid4(),
                "conversation_id": conversation_id,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"m{i}",
                "message_metadata": {},
                "created_at": start + timedelta(seconds=i),
            }
            for i in range(total)
        ],
    )
    db_session.commit()

    detail = client.get(f"{URL}/{conversation_id}", headers=alice["headers"]).get_json()
    assert detail["message_count"] == total and detail["messages_truncated"] is True
    contents = [m["content"] for m in detail["messages"]]
    assert contents == [f"m{i}" for i in range(2, total)]
    assert detail["messages"][-1]["role"] == "assistant"

    url = f"{URL}/{conversation_id}/messages"
    page = client.get(f"{url}?limit=200", headers=alice["headers"]).get_json()
    seen = [m["content"] for m in page["items"]]
    while page["next_cursor"]:
        page = client.get(
            f"{url}?limit=200&cursor={page['next_cursor']}", headers=alice["headers"]
        ).get_json()
        seen += [m["content"] for m in page["items"]]
    assert seen == [f"m{i}" for i in reversed(range(total))]


def test_delete_removes_messages_and_unlinks_campaigns(client, alice, db_session):
    conversation = create(client, alice, title="Doomed")
    other = create(client, alice, title="Kept")
    say(client, alice, conversation["id"], "one")
    say(client, alice, other["id"], "two")
    campaign = Campaign(
        user_id=alice["id"], name="From chat", conversation_id=uuid.UUID(conversation["id"])
    )
    db_session.add(campaign)
    db_session.commit()

    response = client.delete(f"{URL}/{conversation['id']}", headers=alice["headers"])
    assert response.status_code == 204 and response.get_data() == b""
    assert_error(
        client.get(f"{URL}/{conversation['id']}", headers=alice["headers"]), 404, "not_found"
    )
    assert list(db_session.scalars(select(Message.content))) == ["two"]
    assert db_session.execute(select(Campaign.name, Campaign.conversation_id)).all() == [
        ("From chat", None)
    ]
    assert_error(
        client.delete(f"{URL}/{conversation['id']}", headers=alice["headers"]), 404, "not_found"
    )


def test_another_users_conversation_is_not_found_on_every_route(client, alice, bob, db_session):
    conversation = create(client, alice, title="Private")
    say(client, alice, conversation["id"], "secret plan")
    url = f"{URL}/{conversation['id']}"
    attempts = [
        client.get(url, headers=bob["headers"]),
        client.patch(url, json={"status": "archived"}, headers=bob["headers"]),
        client.get(f"{url}/messages", headers=bob["headers"]),
        client.post(f"{url}/messages", json={"content": "hi"}, headers=bob["headers"]),
        client.delete(url, headers=bob["headers"]),
    ]
    for response in attempts:
        assert_error(response, 404, "not_found")
        assert "secret plan" not in response.get_data(as_text=True)
    assert (
        attempts[0].get_json()
        == client.get(f"{URL}/{uuid.uuid4()}", headers=bob["headers"]).get_json()
    )
    assert client.get(URL, headers=bob["headers"]).get_json() == {
        "items": [],
        "next_cursor": None,
    }
    row = db_session.execute(select(Conversation.title, Conversation.status)).one()
    assert tuple(row) == ("Private", "active")
    assert list(db_session.scalars(select(Message.content))) == ["secret plan"]


def test_routes_are_in_the_openapi_document(client):
    paths = client.get("/api/v1/openapi.json").get_json()["paths"]
    assert set(paths[URL]) == {"get", "post"}
    assert set(paths[f"{URL}/{{conversation_id}}"]) >= {"get", "patch", "delete"}
    messages = paths[f"{URL}/{{conversation_id}}/messages"]
    assert set(messages) >= {"get", "post"}
    assert "409" in messages["post"]["responses"]
