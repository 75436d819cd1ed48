"""Loyalty points, a Weir plugin in Python.

Every placed order earns its customer points (one per whole currency unit
by default, `points-per-unit` in the manifest's [config]); the running
total is kept in the plugin's state, so it survives restarts and is
updated exactly once per order. Each award is announced on
`loyalty.awarded`; crossing a tier threshold also emits `loyalty.tier`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import config, emit, log, state, types

from points import earned, tier_of


def reject(reason: str) -> Err:
    """The event can never succeed: dead-letter it."""
    return Err(types.Error_Reject(reason))


def config_int(key: str, default: int) -> int:
    value = config.get(key)
    return default if value is None else int(json.loads(value))


def tiers() -> dict[str, int]:
    raw = config.get("tiers")
    table = json.loads(raw) if raw else {"silver": 500, "gold": 2000}
    return {name: int(threshold) for name, threshold in table.items()}


# The settings are read once per instance. An instance belongs to one
# plugin version, whose manifest (and so config) cannot change under it;
# Weir may reuse an instance for many events, or not, and either is fine
# for a cache like this. Durable data goes through `state`, never here.
_settings: tuple[int, dict[str, int]] | None = None


def settings() -> tuple[int, dict[str, int]]:
    global _settings
    if _settings is None:
        _settings = (config_int("points-per-unit", 1), tiers())
    return _settings


def publish(subject: str, body: dict, customer: str) -> None:
    headers = [types.Header("Customer-Id", customer)]
    emit.publish(subject, headers, json.dumps(body, separators=(",", ":")).encode())


class Handler(exports.Handler):
    def handle(self, event: types.Event) -> None:
        try:
            order = json.loads(event.payload)
            customer = str(order["customer_id"])
            order_id = str(order["order_id"])
            cents = int(order["amount_cents"])
        except (ValueError, KeyError, TypeError) as e:
            raise reject(f"order {event.id} is not a valid order: {e!r}")
        if cents < 0:
            raise reject(f"order {order_id} has a negative amount")

        per_unit, table = settings()
        points = earned(cents, per_unit)
        key = f"points.{customer}"
        stored = state.get(key)
        before = int(stored) if stored is not None else 0
        total = before + points
        state.set(key, str(total).encode())

        publish(
            "loyalty.awarded",
            {"customer_id": customer, "order_id": order_id, "earned": points, "total": total},
            customer,
        )
        old_tier, new_tier = tier_of(before, table), tier_of(total, table)
        if new_tier != old_tier:
            publish("loyalty.tier", {"customer_id": customer, "tier": new_tier}, customer)
            log.log(log.Level.INFO, f"customer {customer} reached tier {new_tier}")
