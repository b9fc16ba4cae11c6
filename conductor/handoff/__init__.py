"""The file handoff protocol: publish, claim, lease, complete, reap, watch.

See docs/protocol.md for the contract an executor in any language implements.
"""
