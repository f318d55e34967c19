"""Operator tooling: PKI, broker ACLs and configs, signed config push, fleet view (`ccus ops`)."""
