"""What runs after a message is routed, inside the routing transaction."""

from __future__ import annotations

from router.pipeline import Hook


def default_hooks() -> list[Hook]:
    from router.ack import ack_hook
    from router.escalate import sla_hook

    return [ack_hook, sla_hook]
