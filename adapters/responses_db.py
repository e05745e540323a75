"""The catalog's stored responses (OpenAI's Responses API, `store: true`) and their SQL.

A response is kept with its own input items and the conversation before it (`context`: the items
a later response's `previous_response_id` continues from), owned by its tenant, until it expires
(--response-retention-days) or is deleted. A tenant keeps at most `max_stored_responses`: the
count is checked in the transaction that inserts, after the insert (as batches are), so two
gateways of one catalog cannot both slip under it. Expired rows are deleted as an owner stores
another, and by a periodic prune.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from adapters.database import CatalogTables, metadata
from adapters.errors import QuotaExceeded

responses_table = sa.Table(
    "responses",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("response", sa.Text, nullable=False),  # the Response object, as JSON
    sa.Column("input_items", sa.Text, nullable=False),  # this request's input items
    sa.Column("context", sa.Text, nullable=False),  # the items before them (earlier turns)
)


class ResponsesQuotaExceeded(QuotaExceeded):
    """A tenant stores as many responses as it may; nothing was stored."""

    def __init__(self, stored: int, limit: int):
        super().__init__(
            f"this tenant stores {stored} responses, its limit (max_stored_responses {limit}); delete some "
            "(DELETE /v1/responses/{id}), wait for them to expire, or send store: false",
            limit="max_stored_responses",
        )


@dataclass(frozen=True)
class StoredResponse:
    id: str
    owner: str
    created_at: float
    expires_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """The items a response continuing this one starts from: its context, input and output."""
        return [*self.context, *self.input_items, *self.response.get("output", [])]


class ResponseRecords(CatalogTables):
    """Stored responses in the catalog database."""

    def add(self, row: StoredResponse, max_stored: int | None, now: float) -> None:
        """Insert a response while its owner exists and stays within `max_stored` (None: no limit)."""
        table = responses_table
        with self._write() as conn:
            self.catalog.lock_owner(conn, row.owner)
            conn.execute(table.delete().where(table.c.owner == row.owner, table.c.expires_at <= now))
            conn.execute(
                table.insert().values(
                    id=row.id,
                    owner=row.owner,
                    created_at=row.created_at,
                    expires_at=row.expires_at,
                    response=json.dumps(row.response),
                    input_items=json.dumps(row.input_items),
                    context=json.dumps(row.context),
                )
            )
            self.catalog.hold_owner(conn, row.owner)
            if max_stored is not None:
                stored = conn.execute(sa.select(sa.func.count()).where(table.c.owner == row.owner)).scalar_one()
                if stored > max_stored:
                    raise ResponsesQuotaExceeded(stored - 1, max_stored)

    def get(self, response_id: str, now: float) -> StoredResponse | None:
        table = responses_table
        rows = self._read(sa.select(table).where(table.c.id == response_id, table.c.expires_at > now))
        return _stored(rows[0]) if rows else None

    def count(self, owner: str, now: float) -> int:
        table = responses_table
        statement = sa.select(sa.func.count()).where(table.c.owner == owner, table.c.expires_at > now)
        return self._read(statement)[0][0]

    def delete(self, response_id: str) -> bool:
        with self._write() as conn:
            return conn.execute(responses_table.delete().where(responses_table.c.id == response_id)).rowcount > 0

    def prune(self, now: float) -> int:
        """Delete every expired response; how many."""
        with self._write() as conn:
            return conn.execute(responses_table.delete().where(responses_table.c.expires_at <= now)).rowcount


def _stored(r: sa.Row) -> StoredResponse:
    return StoredResponse(
        id=r.id,
        owner=r.owner,
        created_at=r.created_at,
        expires_at=r.expires_at,
        response=json.loads(r.response),
        input_items=json.loads(r.input_items),
        context=json.loads(r.context),
    )
