"""HTTPS frontend: TLS listener, login/step-up/logout pages, auth middleware, and the
identity-aware streaming reverse proxy (header rewriting, assertion JWT, HTTP + WebSocket)."""
