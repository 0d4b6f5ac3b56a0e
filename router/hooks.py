"""What runs after a message is routed, inside the routing transaction."""

from __future__ import annotations

from router.pipeline import Hook


def default_hooks() -> list[Hook]:
    from router.ack import ack_hook
    from router.agentmail import notify_hook
    from router.assign import assignment_hook
    from router.escalate import sla_hook

    # Assignment first: the agents' notification goes to the assignee only, and the
    # escalation ladder's "assignee" target has someone from the start.
    return [assignment_hook, ack_hook, sla_hook, notify_hook]
